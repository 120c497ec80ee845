"""Adapter-merge benchmark: merging N LoRA adapters vs merging the same experts as full checkpoints.

A random Llama (hidden 1024, 8 layers, vocab 32000, bf16) and N peft LoRA adapters of it (r=16 on q, k, v,
o, gate, up, down; random non-zero A and B) are built once under --work; each adapter is also materialised
by peft's `merge_and_unload` into a full checkpoint. Then the same recipe (TIES shared weights, random
gates) is merged from the adapters and from the full checkpoints, each merge in its own process, timed
wall-clock with the peak RSS of that process sampled by psutil (rounds alternate the order; the best
round of each is kept). Target: the adapter merge's peak RSS ≤ the full-checkpoint merge's.

    .venv/bin/python bench/adapter_merge_bench.py [--adapters 4] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_inputs(work: Path, adapters: int, rank: int) -> tuple[Path, list[Path], list[Path]]:
    """Base, adapters and their peft-materialised full checkpoints (cached under `work`)."""
    base = work / "base"
    lora = [work / f"lora-{i}" for i in range(adapters)]
    full = [work / f"full-{i}" for i in range(adapters)]
    marker = work / f"built-{adapters}-r{rank}.json"
    if marker.exists():
        return base, lora, full
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from merge.tiny import build_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(base)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(base))
    for i, (adapter, dense) in enumerate(zip(lora, full, strict=True)):
        model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.01 * torch.randn(param.shape, generator=generator))
        peft_model.save_pretrained(str(adapter))
        del peft_model, model
        model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(str(dense))
        tok.save_pretrained(dense)
        del model
    marker.write_text(json.dumps({"adapters": adapters, "rank": rank}))
    return base, lora, full


def write_recipe(work: Path, label: str, base: Path, experts: list[Path], method: str) -> Path:
    recipe = {
        "base": str(base),
        "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts)],
        "shared": {"method": method},
        "gate": {"init": "random"},
        "dtype": "bfloat16",
    }
    path = work / f"recipe-{label}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def child(recipe: Path, out: Path) -> None:
    """Run one merge in this process (the parent measures it) and print its report's numbers."""
    from merge.build import merge_experts
    from merge.recipe import load_recipe

    report = merge_experts(load_recipe(recipe), out, overwrite=True)
    print(json.dumps({"seconds": report["seconds"], "peak_rss_mib": report["peak_rss_mib"]}))


def measure(recipe: Path, out: Path) -> dict[str, Any]:
    """Wall seconds and peak RSS (MiB) of a child process merging `recipe`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", str(recipe), str(out)]
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
        process = psutil.Process(proc.pid)
        peak = 0.0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, process.memory_info().rss / 2**20)
            time.sleep(0.01)
        wall = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"merge of {recipe} failed:\n{stderr.read().decode()[-3000:]}")
        inner = json.loads(stdout.read().decode().strip().splitlines()[-1])
    return {
        "wall_s": wall,
        "peak_rss_mib": peak,
        "merge_s": inner["seconds"],
        "merge_peak_rss_mib": inner["peak_rss_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "adapter-bench")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--child", nargs=2, type=Path, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    base, lora, full = build_inputs(args.work, args.adapters, args.rank)
    recipes = {
        "adapters": write_recipe(args.work, "adapters", base, lora, args.method),
        "full checkpoints": write_recipe(args.work, "full", base, full, args.method),
    }
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in recipes}
    for round_index in range(args.rounds):
        order = list(recipes) if round_index % 2 == 0 else list(reversed(recipes))
        for label in order:
            runs[label].append(measure(recipes[label], args.work / f"out-{label.split()[0]}"))
    best = {label: {k: min(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
    ref = best["full checkpoints"]
    mib = 2**20
    sizes = {
        "adapter MiB (each)": sum(p.stat().st_size for p in lora[0].glob("*.safetensors")) / mib,
        "full checkpoint MiB (each)": sum(p.stat().st_size for p in full[0].glob("*.safetensors")) / mib,
    }
    print(
        f"{args.adapters} experts, r={args.rank}, shared {args.method}, random gates, bf16; "
        f"best of {args.rounds} rounds; sizes: " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items())
    )
    print("| merge inputs | wall s (× full) | peak RSS MiB (× full) | in-merge peak RSS MiB (× full) |")
    print("|---|---|---|---|")
    for label, b in best.items():
        print(
            f"| {label} | {b['wall_s']:.2f} ({b['wall_s'] / ref['wall_s']:.3f}×) "
            f"| {b['peak_rss_mib']:.1f} ({b['peak_rss_mib'] / ref['peak_rss_mib']:.3f}×) "
            f"| {b['merge_peak_rss_mib']:.1f} ({b['merge_peak_rss_mib'] / ref['merge_peak_rss_mib']:.3f}×) |"
        )
    if args.json:
        print(json.dumps({"runs": runs, "best": best, "sizes": sizes}, indent=2))


if __name__ == "__main__":
    main()
