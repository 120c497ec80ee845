"""Merge benchmark: moerge vs mergekit-moe on the same experts, in one run.

Each merge runs as its own process (the real CLIs), timed wall-clock with peak RSS of its process tree
sampled by psutil. Every output is then loaded by a real vLLM engine with its native loader, and its
held-out perplexity per domain is measured with transformers. mergekit lives in its own virtualenv
(.cache/mergekit-venv, created on first use) so its dependencies stay apart from moerge's.

    .venv/bin/python bench/merge_bench.py [--json] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge.evaluate import load_causal_lm, perplexity  # noqa: E402
from merge.tiny import TINY_DOMAINS, TinyZoo, build_tiny_zoo, build_tokenizer, domain_prompts  # noqa: E402

CACHE = ROOT / ".cache"
MERGEKIT_VENV = CACHE / "mergekit-venv"
WORK = CACHE / "merge-bench"
VLLM_PROBE = """
import sys
def main():
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, dtype="float32")
    out = llm.generate(["If we compute 2 + 2 we get"], SamplingParams(max_tokens=4, temperature=0))
    print("GENERATED", len(out[0].outputs[0].token_ids))
if __name__ == "__main__":
    main()
"""


SMOLLM2_SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}
# A larger random shape (issue 16): hidden 2048, 16 layers, 4 experts; moerge only (see --shape).
LARGE_SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
LARGE_DOMAINS = [*TINY_DOMAINS, "mixed"]  # a 4th expert; its prompts are the first three's, interleaved


def build_smollm2_shaped_zoo(root: Path) -> TinyZoo:
    """Random experts with SmolLM2-135M's shape (30 layers, hidden 576): timing and memory at real size.

    Experts are the base plus seeded noise on every tensor; their perplexities mean nothing, their
    merge cost is that of real 135M-parameter fine-tunes.
    """
    return build_random_zoo(root, SMOLLM2_SHAPE, TINY_DOMAINS)


def build_random_zoo(root: Path, shape: dict, domains: list[str]) -> TinyZoo:
    """Random experts of a given Llama shape: the base plus seeded noise on every tensor (bf16)."""
    if (root / "zoo.json").exists():
        return TinyZoo(root, root / "base", {d: root / f"expert-{d}" for d in domains}, {})
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(root / "tokenizer")
    config = LlamaConfig(
        **shape,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i, d in enumerate(domains):
        gen = torch.Generator().manual_seed(i + 1)
        noisy = {
            k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
            for k, v in state.items()
        }
        base.load_state_dict(noisy)
        del noisy
        base.save_pretrained(root / f"expert-{d}")
        tok.save_pretrained(root / f"expert-{d}")
    (root / "zoo.json").write_text("{}")
    return TinyZoo(root, root / "base", {d: root / f"expert-{d}" for d in domains}, {})


def ensure_mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-moe"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
        pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0", "mergekit==0.1.5"], check=True)
    return exe


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """Run `cmd`; return (wall seconds, peak RSS MiB of its process tree, exit code)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    root = psutil.Process(proc.pid)
    peak = 0.0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree) / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr.read().decode()[-2000:], file=sys.stderr)
    return wall, peak, proc.returncode


def _params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = fh.get_slice(key).get_shape()
                total += int(__import__("math").prod(shape))
    return total


def loads_in_vllm(model_dir: Path) -> bool:
    probe = model_dir.parent / "vllm_probe.py"
    probe.write_text(VLLM_PROBE)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(probe), str(model_dir)], capture_output=True, text=True, env=env
    )
    return "GENERATED" in result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--skip-vllm", action="store_true", help="do not start vLLM to check native loading")
    parser.add_argument("--prompts", type=int, default=32, help="gate-calibration prompts per expert")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of every merge; the best time is kept")
    parser.add_argument(
        "--shape",
        choices=["tiny", "smollm2", "large"],
        default="tiny",
        help="tiny: trained tiny experts (quality); smollm2: random experts of SmolLM2-135M's shape (cost); "
        "large: random hidden-2048 experts, 4 of them, moerge only (scaling of time and memory)",
    )
    parser.add_argument("--layers", type=int, help="--shape large: decoder layers (default 16)")
    args = parser.parse_args()
    domains = list(TINY_DOMAINS)
    if args.shape == "tiny":
        zoo = build_tiny_zoo(CACHE / "tiny-zoo")
    elif args.shape == "smollm2":
        zoo = build_smollm2_shaped_zoo(CACHE / "smollm2-shaped-zoo")
    else:
        shape = {**LARGE_SHAPE, "num_hidden_layers": args.layers or LARGE_SHAPE["num_hidden_layers"]}
        domains = LARGE_DOMAINS
        zoo = build_random_zoo(CACHE / f"large-zoo-{shape['num_hidden_layers']}l", shape, domains)
    work = WORK / (args.shape if args.shape != "large" else zoo.root.name)
    work.mkdir(parents=True, exist_ok=True)
    with_mergekit = args.shape != "large"  # mergekit-moe at this size would take longer than this bench may
    mergekit = ensure_mergekit() if with_mergekit else None
    prompts = {d: domain_prompts(d, args.prompts, seed=0) for d in TINY_DOMAINS}
    prompts["mixed"] = [p for triple in zip(*prompts.values(), strict=True) for p in triple][: args.prompts]
    held_out = {d: domain_prompts(d, 40, seed=4242) for d in TINY_DOMAINS}
    dtype = "float32" if args.shape == "tiny" else "bfloat16"

    def moerge_recipe(gate: str) -> Path:
        path = work / f"moerge-{gate}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "base": str(zoo.base),
                    "experts": [
                        {"name": d, "path": str(zoo.experts[d]), "positive_prompts": prompts[d]}
                        for d in domains
                    ],
                    "shared": {"method": "ties"},
                    "gate": {"init": gate},
                    "experts_per_token": 2,
                    "dtype": dtype,
                }
            )
        )
        return path

    mk_config = work / "mergekit-hidden.yaml"
    mk_config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(zoo.base),
                "gate_mode": "hidden",
                "dtype": dtype,
                "experts_per_token": 2,
                "experts": [
                    {"source_model": str(zoo.experts[d]), "positive_prompts": prompts[d]}
                    for d in TINY_DOMAINS
                ],
            }
        )
    )
    moerge_exe = str(Path(sys.executable).with_name("moerge"))
    runs = [
        (
            "moerge (ties + ridge gates)",
            [moerge_exe, "merge", str(moerge_recipe("ridge")), str(work / "moerge-ridge"), "--overwrite"],
            work / "moerge-ridge",
        ),
        (
            "moerge (ties + hidden gates)",
            [moerge_exe, "merge", str(moerge_recipe("hidden")), str(work / "moerge-hidden"), "--overwrite"],
            work / "moerge-hidden",
        ),
    ]
    if mergekit is not None:
        runs.append(
            (
                "mergekit-moe 0.1.5 (hidden gates)",
                [str(mergekit), str(mk_config), str(work / "mergekit-hidden"), "--device", "cpu"],
                work / "mergekit-hidden",
            )
        )
    else:
        runs = runs[:1]
    rows = []
    # The machine is shared and noisy: the tools take turns, `--repeat` rounds, and each keeps its best time.
    timings: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _, _ in runs}
    for _ in range(args.repeat):
        for name, cmd, out in runs:
            if out.exists() and "mergekit" in name:
                subprocess.run(["rm", "-rf", str(out)], check=True)
            timings[name].append(measure(cmd))
    for name, _, out in runs:
        wall, peak, code = min(timings[name])
        row = {"tool": name, "seconds": round(wall, 2), "peak_rss_mib": round(peak, 1), "ok": code == 0}
        row["rounds"] = [{"seconds": round(w, 2), "peak_rss_mib": round(m, 1)} for w, m, _ in timings[name]]
        if code == 0 and name.startswith("moerge"):
            report = json.loads((out / "merge-report.json").read_text())
            row["merge_seconds"], row["output_bytes"] = report["seconds"], report["output_bytes"]
            row["input_params_per_model"] = _params(zoo.base)
        if code == 0 and args.shape == "tiny":
            model, tok = load_causal_lm(out)
            row["perplexity"] = {d: round(perplexity(model, tok, held_out[d]), 3) for d in TINY_DOMAINS}
        if code == 0:
            row["vllm_native"] = None if args.skip_vllm else loads_in_vllm(out)
        rows.append(row)
    dense = [("base", zoo.base), *[(f"dense expert {d}", zoo.experts[d]) for d in TINY_DOMAINS]]
    for label, folder in dense if args.shape == "tiny" else []:
        model, tok = load_causal_lm(folder)
        rows.append(
            {
                "tool": label,
                "perplexity": {d: round(perplexity(model, tok, held_out[d]), 3) for d in TINY_DOMAINS},
            }
        )
    mk = next((r for r in rows if r["tool"].startswith("mergekit")), None)
    for row in rows[:2] if mk is not None else []:
        row["time_ratio_vs_mergekit"] = round(row["seconds"] / mk["seconds"], 3)
        row["rss_ratio_vs_mergekit"] = round(row["peak_rss_mib"] / mk["peak_rss_mib"], 3)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    header = (
        "| merge | wall s (× mergekit) | peak RSS MiB (× mergekit) | native vLLM load | "
        + " | ".join(f"ppl {d}" for d in TINY_DOMAINS)
        + " |"
    )
    print(header)
    print("|" + "---|" * (4 + len(TINY_DOMAINS)))
    for row in rows:
        ppl = " | ".join(f"{row['perplexity'][d]:.2f}" if "perplexity" in row else "—" for d in TINY_DOMAINS)
        if "seconds" not in row:
            print(f"| {row['tool']} | — | — | — | {ppl} |")
            continue
        ratio_t = f" ({row['time_ratio_vs_mergekit']}×)" if "time_ratio_vs_mergekit" in row else ""
        ratio_m = f" ({row['rss_ratio_vs_mergekit']}×)" if "rss_ratio_vs_mergekit" in row else ""
        native = {True: "yes", False: "no", None: "not checked"}[row.get("vllm_native")]
        print(
            f"| {row['tool']} | {row['seconds']}{ratio_t} | {row['peak_rss_mib']}{ratio_m} | {native} | {ppl} |"
        )


if __name__ == "__main__":
    main()
