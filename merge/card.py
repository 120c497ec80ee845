"""The model card: what went into a merge (recipe, sha256 of every input) and how its gates route."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from merge.checkpoint import TOKENIZER_FILES
from merge.recipe import Recipe


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    keep = {"config.json", "adapter_config.json", *TOKENIZER_FILES}
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name in keep)


def input_hashes(recipe: Recipe) -> dict[str, dict[str, str]]:
    """sha256 of every file the merge read, grouped by model (and data files under `data`)."""
    out: dict[str, dict[str, str]] = {}
    models = [("base", recipe.base)] if recipe.base else []
    models += [(e.name, e.path) for e in recipe.experts]
    for name, folder in models:
        out[name] = {p.name: file_sha256(p) for p in _model_files(Path(folder))}
    data = {str(s.path): file_sha256(s.path) for e in recipe.experts for s in e.data}
    if data:
        out["data"] = data
    return out


def hash_inputs_in_background(recipe: Recipe) -> Callable[[], dict[str, dict[str, str]]]:
    """Start `input_hashes` on a daemon thread; the returned call waits for it (and re-raises its error).

    hashlib releases the GIL, so the hashing overlaps the merge's single-threaded parts (TIES, reading,
    writing) instead of adding ≈ 1 s per GB of inputs at the end; a daemon thread, so a failing merge exits
    at once rather than after hashing every input."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["hashes"] = input_hashes(recipe)
        except BaseException as err:  # handed to the caller of wait()
            result["error"] = err

    thread = threading.Thread(target=run, name="input-hashes", daemon=True)
    thread.start()

    def wait() -> dict[str, dict[str, str]]:
        thread.join()
        if "error" in result:
            raise result["error"]
        hashes: dict[str, dict[str, str]] = result["hashes"]
        return hashes

    return wait


def write_model_card(folder: Path, recipe: Recipe, report: dict[str, Any], recipe_text: str | None) -> None:
    recipe_yaml = recipe_text or yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    arch = report.get("architecture", "MixtralForCausalLM")
    kind = "dense merge" if report["mode"] == "dense" else f"{arch} MoE of {report['num_experts']} experts"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moerge, merge" + ("" if report["mode"] == "dense" else ", moe") + "]",
        "---",
        f"# {folder.name if not folder.name.startswith('.') else 'moerge merge'}",
        "",
        f"A {kind} written by `moerge merge`: shared weights merged with `{recipe.shared.method}`"
        + ("" if report["mode"] == "dense" else f", gates initialised with `{recipe.gate.init}`")
        + ". It loads natively in vLLM (`vllm serve <this folder>`) and in transformers.",
        "",
        "## Experts",
        "",
        "| # | expert | mean share of its own calibration tokens routed to it |",
        "|---|---|---|",
    ]
    for i, name in enumerate(report["experts"]):
        share = report["mean_own_share"].get(name)
        lines.append(f"| {i} | {name} | {'—' if share is None else f'{share:.1%}'} |")
    if report["unused_experts"]:
        lines += [
            "",
            f"**Unused experts** (under 1% of a layer's tokens): {', '.join(report['unused_experts'])}",
        ]
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", "", "## Inputs (sha256)", ""]
    for model, files in report["inputs"].items():
        lines.append(f"- **{model}**")
        lines += [f"  - `{name}` `{digest}`" for name, digest in files.items()]
    lines += [
        "",
        "## Merge",
        "",
        f"{report['seconds']} s, peak RSS {report['peak_rss_mib']} MiB. Per-layer gate statistics: "
        "`merge-report.json`.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
