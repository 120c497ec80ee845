"""Synthetic exact-arithmetic prompts ("What is 482 + 39?"): the heterogeneous expert's narrow skill.

Held-out rows are disjoint from the training rows by their (a, op, b) problem, not only by phrasing.
The answer is scored by exact match of the last integer in the reply, for any model.
"""

from __future__ import annotations

import random
import re
from typing import Any

from moerge.zoo.config import ArithmeticData

TEMPLATES = (
    "What is {a} {op} {b}?",
    "What is {a} {word} {b}?",
    "Calculate {a} {op} {b}.",
    "Compute {a} {op} {b}",
    "{a} {op} {b} = ?",
    "How much is {a} {word} {b}?",
    "Please work out {a} {op} {b}.",
    "Solve: {a} {op} {b}",
)
WORDS = {"+": "plus", "-": "minus"}
_INT = re.compile(r"-?\d[\d,]*")


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _problem(rng: random.Random, max_digits: int) -> tuple[int, str, int]:
    a, b = _number(rng, max_digits), _number(rng, max_digits)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def make_row(
    a: int, op: str, b: int, rng: random.Random, domain: str, index: int, split: str
) -> dict[str, Any]:
    prompt = rng.choice(TEMPLATES).format(a=a, op=op, b=b, word=WORDS[op])
    result = answer(a, op, b)
    return {
        "id": f"{domain}-{split}-{index}",
        "domain": domain,
        "source": "synthetic",
        "prompt": prompt,
        "response": f"{a} {op} {b} = {result}",
        "answer": str(result),
    }


def generate_rows(spec: ArithmeticData, domain: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, heldout) rows; held-out problems never occur in train."""
    rng = random.Random(f"{spec.seed}:{domain}:heldout")
    held_problems: list[tuple[int, str, int]] = []
    seen: set[tuple[int, str, int]] = set()
    while len(held_problems) < spec.heldout:
        problem = _problem(rng, spec.max_digits)
        if problem not in seen:
            seen.add(problem)
            held_problems.append(problem)
    held = [make_row(*p, rng, domain, i, "heldout") for i, p in enumerate(held_problems)]
    rng = random.Random(f"{spec.seed}:{domain}:train")
    train: list[dict[str, Any]] = []
    attempts = 0
    while len(train) < spec.train and attempts < spec.train * 20:
        attempts += 1
        problem = _problem(rng, spec.max_digits)
        if problem not in seen:
            train.append(make_row(*problem, rng, domain, len(train), "train"))
    return train, held


def extract_answer(text: str) -> int | None:
    """The last integer in a reply (commas allowed), or None."""
    found = _INT.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", "").rstrip(","))
    except ValueError:
        return None


def exact_match(replies: list[str], rows: list[dict[str, Any]]) -> float:
    hits = sum(extract_answer(r) == int(row["answer"]) for r, row in zip(replies, rows, strict=True))
    return hits / max(len(rows), 1)
