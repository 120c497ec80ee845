"""Does Qwen2-MoE's shared expert (the base's FFN, `output.shared_expert: base`) help? Held-out perplexity
per domain of tiny trained Qwen2 experts merged with and without it, top-1 and top-2, same run.

The experts are a tiny Qwen2 zoo (hidden 128, 2 layers, trained base + one fine-tune per domain, built by
`merge.tiny.build_tiny_zoo(family="qwen2")` under .cache/tiny-zoo-qwen2); every MoE uses TIES shared
weights and ridge gates on 48 prompts per expert; perplexity on 40 held-out prompts per domain.

    .venv/bin/python bench/shared_expert_bench.py [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge.build import merge_experts  # noqa: E402
from merge.evaluate import load_causal_lm, perplexity  # noqa: E402
from merge.recipe import Recipe  # noqa: E402
from merge.tiny import TINY_DOMAINS, TinyZoo, build_tiny_zoo, domain_prompts  # noqa: E402

WORK = ROOT / ".cache" / "shared-expert-bench"
VARIANTS: dict[str, dict[str, Any]] = {
    "top-1, no shared expert": {"experts_per_token": 1},
    "top-1, shared = base (β 0.5)": {"experts_per_token": 1, "output": {"shared_expert": "base"}},
    "top-1, shared = base (β 0.25)": {
        "experts_per_token": 1,
        "output": {"shared_expert": "base", "shared_expert_weight": 0.25},
    },
    "top-2, no shared expert": {"experts_per_token": 2},
    "top-2, shared = base (β 0.5)": {"experts_per_token": 2, "output": {"shared_expert": "base"}},
}


def recipe(zoo: TinyZoo, **overrides: Any) -> Recipe:
    raw: dict[str, Any] = {
        "base": str(zoo.base),
        "experts": [
            {"name": d, "path": str(zoo.experts[d]), "data": [{"path": str(zoo.data[d]), "limit": 48}]}
            for d in TINY_DOMAINS
        ],
        "shared": {"method": "ties"},
        "dtype": "float32",
        **overrides,
    }
    return Recipe.model_validate(raw)


def ppl_row(folder: Path, held_out: dict[str, list[str]]) -> dict[str, float]:
    model, tok = load_causal_lm(folder)
    return {d: round(perplexity(model, tok, texts), 2) for d, texts in held_out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    zoo = build_tiny_zoo(ROOT / ".cache" / "tiny-zoo-qwen2", family="qwen2")
    held_out = {d: domain_prompts(d, 40, seed=12345) for d in TINY_DOMAINS}
    rows: dict[str, dict[str, float]] = {"base": ppl_row(zoo.base, held_out)}
    rows.update({f"dense expert {d}": ppl_row(zoo.experts[d], held_out) for d in TINY_DOMAINS})
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        out = WORK / f"moe-{i}"
        report = merge_experts(recipe(zoo, **overrides), out)
        assert report["architecture"] == "Qwen2MoeForCausalLM" and report["load_check"]["complete"]
        rows[f"MoE {name}"] = ppl_row(out, held_out)
    print("| model | " + " | ".join(f"ppl {d}" for d in TINY_DOMAINS) + " |")
    print("|---|" + "---|" * len(TINY_DOMAINS))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[d]:.2f}" for d in TINY_DOMAINS) + " |")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
