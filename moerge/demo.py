"""The main job: build the demo zoo if absent (cached), show what was measured, then serve it.

`moerge demo` builds runs/zoo (real SmolLM2-135M experts, their MoE, a GPT-2 arithmetic expert and the
router; see `moerge zoo build`), prints example requests, and replaces itself with
`moerge serve runs/zoo/serve.yaml`. `moerge demo --tiny` runs the old fast offline demo: tiny experts →
MoE → one vLLM engine → one continuation per domain.
May import: merge (the tiny zoo and its merge), serving.vllm_boundary (vLLM's offline engine), moerge's
zoo, openai, rich.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {"math": "If we compute 21 + 14 we get", "code": "def total_fn(items):", "text": "The quiet river"}
EXAMPLE_PROMPT = "What is 4821 + 397?"


def example_requests(port: int) -> str:
    """curl and openai-SDK snippets for the zoo's gateway on `port`."""
    return f"""\
curl -s localhost:{port}/v1/chat/completions -H 'content-type: application/json' \\
  -d '{{"model": "auto", "messages": [{{"role": "user", "content": "{EXAMPLE_PROMPT}"}}]}}'
curl -s localhost:{port}/v1/models          # auto, ab (A/B: learned router vs coin), moe, base, arithmetic

python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="http://localhost:{port}/v1", api_key="unused")
for prompt in ["{EXAMPLE_PROMPT}", "Write a Python function that reverses a string.",
               "Natalia sold 48 clips in April and half as many in May. How many in total?"]:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{{"role": "user", "content": prompt}}], max_tokens=64)
    print(raw.headers["x-moerge-expert"], "→", raw.parse().choices[0].message.content)
EOF"""


def measured_table(summary: dict[str, Any]) -> Table:
    table = Table("measure", "value", title="demo zoo (from runs/zoo/manifest.json)")
    for expert, row in (summary.get("expert_vs_base") or {}).items():
        table.add_row(
            f"{expert} expert: held-out NLL on {row['domain']}",
            f"{row['nll']} (base {row['base_nll']}, {row['change']:+.1%})",
        )
    if summary.get("hetero_exact_match") is not None:
        table.add_row(
            "arithmetic expert: exact match",
            f"{summary['hetero_exact_match']:.1%} (SmolLM2 base {summary['base_exact_match']:.1%})",
        )
    if summary.get("router_heldout_accuracy") is not None:
        table.add_row("router: held-out accuracy", f"{summary['router_heldout_accuracy']:.1%}")
    table.add_row("build time (all stages, as recorded)", f"{summary.get('build_seconds_total')} s")
    return table


def run_demo(
    console: Console,
    *,
    tiny: bool = False,
    out: Path = Path("runs/zoo"),
    data: Path = Path("../shared/data"),
    port: int = 8000,
    serve: bool = True,
) -> None:
    if tiny:
        run_tiny_demo(console)
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from moerge.zoo.build import build_zoo
    from moerge.zoo.cli import zoo_progress
    from moerge.zoo.config import ZooConfig

    console.rule(f"1. the demo zoo under {out} (built once, then cached)")
    with zoo_progress(console) as (bar, log):
        summary = build_zoo(out, data, ZooConfig(), bar=bar, log=log)
    console.print(measured_table(summary))
    config = Path(out) / "serve.yaml"
    console.rule(f"2. moerge serve {config} --port {port}")
    console.print("Once the engines are up (a minute or two on CPU), try:\n", style="bold")
    console.print(example_requests(port), highlight=False, markup=False)
    if not serve:
        return
    args = [sys.executable, "-m", "serving", "serve", str(config), "--port", str(port)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, args)  # the gateway owns the process (signals, graceful drain) from here


def run_tiny_demo(console: Console) -> None:
    """Tiny experts (cached under .cache/tiny-zoo) → MoE → real vLLM engine → one answer per domain."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from merge.build import merge_experts
    from merge.recipe import load_recipe
    from merge.tiny import build_tiny_zoo

    console.rule("1. tiny homogeneous experts (cached)")
    zoo = build_tiny_zoo(ROOT / ".cache" / "tiny-zoo")
    console.print(f"base and experts {sorted(zoo.experts)} under {zoo.root}")
    console.rule("2. moerge merge examples/merge-tiny.yaml")
    out = ROOT / ".cache" / "tiny-moe"
    report = merge_experts(load_recipe(ROOT / "examples" / "merge-tiny.yaml"), out, overwrite=True)
    console.print(
        f"MoE of {report['num_experts']} experts in {report['seconds']} s, peak RSS {report['peak_rss_mib']} MiB; "
        f"share of each expert's calibration tokens routed to it: {report['mean_own_share']}"
    )
    console.rule("3. load in vLLM (native Mixtral loader) and generate")
    from serving.vllm_boundary import generate_offline

    texts = generate_offline(
        str(out), list(PROMPTS.values()), 16, enforce_eager=True, max_model_len=256, dtype="float32"
    )
    table = Table("domain", "prompt", "MoE continuation")
    for (domain, prompt), text in zip(PROMPTS.items(), texts, strict=True):
        table.add_row(domain, prompt, text)
    console.print(table)
