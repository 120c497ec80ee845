"""Sweep the MoE's gate calibration: build variants of the zoo's MoE recipe and score them like table 1.

Each variant changes the zoo's recipe (`runs/zoo/moe-recipe.yaml`) by a JSON spec, is built by the real
`moerge merge` (cached by recipe hash under WORK/models), and is scored on the same held-out rows as
`bench/quality.py`'s merge table: perplexity per domain and each domain's own-expert token share.

    .venv/bin/python bench/gate_sweep.py '{"lam 0.1": {"gate": {"ridge_lambda": 0.1}}, \\
        "64 + answers": {"prompts": 64, "answers": true}, "top-2": {"top_k": 2}}'

Spec keys: `gate` (fields of the recipe's `gate`), `prompts` (calibration prompts per expert),
`answers` (true: fit on reference answers too; false: prompts only), `top_k` (experts per token),
`generalist` (domains: add the base model's own FFN as one more expert, calibrated on these domains).
One JSON line per variant is printed. `bench/gate_sweep.json` is the sweep behind the README's merge notes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quality import ROOT, gate_shares, heldout_rows, log, perplexities, release
from quality_variants import Variant, base_recipe, build, varied_recipe

from merge.evaluate import load_causal_lm


def varied(recipe: dict, spec: dict) -> dict:
    """The zoo's recipe with one spec's changes (keys as in the module docstring)."""
    keys = {"gate", "prompts", "answers", "top_k", "generalist"}
    unknown = set(spec) - keys
    if unknown:
        raise SystemExit(f"unknown spec keys {sorted(unknown)}: expected {', '.join(sorted(keys))}")
    return varied_recipe(
        recipe,
        gate=spec.get("gate"),
        prompts=spec.get("prompts"),
        answers=spec.get("answers"),
        top_k=spec.get("top_k"),
        generalist=spec.get("generalist"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", help='JSON object {"name": {spec}, ...}, or a .json file holding one')
    parser.add_argument("--zoo", type=Path, default=ROOT / "runs" / "zoo")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "gate-sweep")
    parser.add_argument("--rows", type=int, default=24, help="held-out prompts per domain")
    parser.add_argument(
        "--domains", default=None, help="comma-separated domains scored (default: the experts' own)"
    )
    args = parser.parse_args()
    specs = json.loads(Path(args.specs).read_text() if args.specs.endswith(".json") else args.specs)
    recipe = base_recipe(args.zoo)
    domains = args.domains.split(",") if args.domains else [e["name"] for e in recipe["experts"]]
    rows = {d: heldout_rows(args.zoo, d, args.rows) for d in domains}
    for name, spec in specs.items():
        started = time.perf_counter()
        variant_recipe = varied(recipe, spec)
        folder = build(Variant(name, "moe", variant_recipe), args.work, {}, log)
        seconds = time.perf_counter() - started
        model, tokenizer = load_causal_lm(folder)
        perplexity = {d: round(v, 4) for d, v in perplexities(model, tokenizer, rows).items()}
        # a domain's own expert: the one calibrated on its train file (data/<domain>.train.jsonl)
        experts = variant_recipe["experts"]
        own = {Path(src["path"]).name.split(".")[0]: i for i, e in enumerate(experts) for src in e["data"]}
        shares = gate_shares(model, tokenizer, rows, own)["own_share"]
        release(model, tokenizer)
        print(
            json.dumps(
                {
                    "name": name,
                    "spec": spec,
                    "build_seconds": round(seconds, 1),  # 0 when the build was cached
                    "perplexity": perplexity,
                    "own_share": {k: round(v, 3) for k, v in shares.items()},
                },
                ensure_ascii=False,
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
