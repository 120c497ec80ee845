"""Held-out NLL of MoE checkpoints of the zoo, scored as the zoo's eval stage scores (64 rows a domain).

    .venv/bin/python bench/gate_nll.py moe moe-arrow moe-arrow-nomirror moe-random [--zoo runs/zoo]

Each name is a folder under the zoo (e.g. `moerge merge runs/zoo/moe-arrow-recipe.yaml runs/zoo/moe-arrow`,
a recipe that changes only the zoo recipe's gate). Prints the NLL per token per domain, and writes it to
ZOO/eval/gate-nll.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moerge.zoo.config import EvalStage
from moerge.zoo.evaluate import Candidate, nll_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="folders under the zoo")
    parser.add_argument("--zoo", type=Path, default=Path("runs/zoo"))
    parser.add_argument("--domains", default="math,code,text")
    args = parser.parse_args()
    heldout = {d: args.zoo / "data" / f"{d}.heldout.jsonl" for d in args.domains.split(",")}
    result = nll_matrix(
        args.zoo / "base", [Candidate(m, args.zoo / m) for m in args.models], heldout, EvalStage()
    )
    (args.zoo / "eval" / "gate-nll.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["nll"], indent=1))


if __name__ == "__main__":
    main()
