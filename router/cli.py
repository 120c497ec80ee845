"""`moerge router ...`: train, evaluate, inspect and pin routers.

Heavy imports (torch, sentence-transformers, scikit-learn) happen inside the commands, so `--help` is
instant (the head registry it lists kinds from imports only numpy and pydantic). Logs and progress bars
go to stderr; `eval` prints only JSON on stdout so it can be piped.
May import: router.*, typer, rich.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer

from router.heads import head_kinds

HEADS = ", ".join(head_kinds())

router_app = typer.Typer(
    no_args_is_help=True,
    help="Train and evaluate the sequence-level router that picks one expert per request.",
)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    _stderr_console().print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


@router_app.command("train")
def train(
    config: Path = typer.Argument(
        ..., help=f"YAML config: experts → JSONL files (+ filters, hold-out), kind ({HEADS}), params."
    ),
    out_dir: Path = typer.Argument(..., help="Directory to write the router artifact into."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact in OUT_DIR."),
) -> None:
    """Train a router from labelled prompts and write a verified artifact (safetensors + JSON + manifest).

    Held-out rows (whole groups and a share of rows, as the config says) are written to
    OUT_DIR/heldout.jsonl and never trained on; evaluate with `moerge router eval OUT_DIR OUT_DIR/heldout.jsonl`.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from router.config import ConfigError, load_config
    from router.data import DataError
    from router.encoder import EncoderError
    from router.train import train_router

    console = _stderr_console()
    if (out_dir / "manifest.json").exists() and not overwrite:
        _fail(f"{out_dir} already holds an artifact; pass --overwrite to replace it")
    try:
        cfg = load_config(config)
    except ConfigError as error:
        _fail(str(error))
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:

        def progress(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        try:
            train_router(cfg, out_dir, progress=progress, log=lambda m: console.print(m, highlight=False))
        except (DataError, EncoderError, ValueError) as error:
            _fail(str(error))


@router_app.command("eval")
def evaluate_cmd(
    artifact: Path = typer.Argument(..., help="Router artifact directory (from `moerge router train`)."),
    data: list[Path] = typer.Argument(
        ..., help="JSONL files with `prompt` and a label field (default `domain`)."
    ),
    kind: str | None = typer.Option(
        None, "--kind", help=f"Evaluate another head the artifact holds ({HEADS})."
    ),
    fast_path: bool = typer.Option(
        True, "--fast-path/--no-fast-path", help="Keep the artifact's n-gram fast path in front of its head."
    ),
    label_field: str | None = typer.Option(
        None, "--label-field", help="Field with the true label [artifact's]."
    ),
    mapping: list[str] = typer.Option(
        [], "--map", help="LABEL=EXPERT, repeatable; adds to the artifact's map."
    ),
    skip_unknown: bool = typer.Option(
        False, "--skip-unknown", help="Skip rows whose label maps to no expert."
    ),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Skip unreadable rows instead of failing."
    ),
    compare: bool = typer.Option(
        False, "--compare", help="Also score every head + majority/random baselines."
    ),
    group_field: str | None = typer.Option(
        None, "--group-field", help="Also report accuracy per value of it."
    ),
    png: Path = typer.Option(
        Path("router-confusion.png"), "--png", help="Where to write the confusion matrix."
    ),
    latency_samples: int = typer.Option(
        200, "--latency-samples", help="Unbatched decisions timed (0: skip)."
    ),
) -> None:
    """Print JSON metrics: accuracy, macro-F1, per-class precision/recall, confusion matrix, ECE, p50/p99
    decision latency, batched throughput; and write a confusion-matrix PNG."""
    from router.artifact import ArtifactError, load_router
    from router.data import DataError
    from router.evaluate import evaluate, load_labelled, plot_confusion
    from router.learned import LearnedRouter

    try:
        router = load_router(artifact, kind=kind, fast_path=None if fast_path else False)
    except (ArtifactError, ValueError) as error:
        _fail(str(error))
    assert isinstance(router, LearnedRouter)
    field = label_field or router.meta["label_field"]
    label_map = _label_map(router.meta["label_map"], mapping, router.experts)
    try:
        rows, y, unknown = load_labelled(
            data, field, label_map, router.experts, skip_unknown, "skip" if skip_bad_rows else "error"
        )
    except DataError as error:
        _fail(str(error))
    result = {
        "artifact": str(artifact),
        "data": [str(d) for d in data],
        "label_field": field,
        "skipped_unknown_labels": unknown,
        **evaluate(
            router, rows, y, compare=compare, latency_samples=latency_samples, group_field=group_field
        ),
    }
    matrix = result["confusion_matrix"]
    plot_confusion(
        matrix["rows_true_cols_predicted"],
        matrix["labels"],
        png,
        f"{router.kind} {router.version}: accuracy {result['accuracy']:.3f}, n={result['n']}",
    )
    result["confusion_png"] = str(png)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _label_map(recorded: dict[str, str], mapping: list[str], experts: list[str]) -> dict[str, str]:
    """The artifact's label → expert map, extended by `--map LABEL=EXPERT` items."""
    label_map = dict(recorded)
    for item in mapping:
        if "=" not in item:
            _fail(f"--map expects LABEL=EXPERT, got {item!r}")
        label, expert = item.split("=", 1)
        if expert not in experts:
            _fail(f"--map {item!r}: {expert!r} is not one of {experts}")
        label_map[label] = expert
    return label_map


@router_app.command("decide")
def decide_cmd(
    artifact: Path = typer.Argument(..., help="Router artifact directory."),
    prompt: str = typer.Argument(..., help="A user message to route."),
    previous: str | None = typer.Option(None, "--previous", help="The conversation's previous expert."),
    kind: str | None = typer.Option(None, "--kind", help=f"Another head the artifact holds ({HEADS})."),
    fast_path: bool = typer.Option(
        True, "--fast-path/--no-fast-path", help="Keep the artifact's n-gram fast path in front of its head."
    ),
) -> None:
    """Route one prompt and print the decision as JSON (expert, scores, confidence, reason)."""
    from router.artifact import ArtifactError, load_router
    from router.base import RoutingRequest

    try:
        router = load_router(artifact, kind=kind, fast_path=None if fast_path else False)
    except (ArtifactError, ValueError) as error:
        _fail(str(error))
    request = RoutingRequest([{"role": "user", "content": prompt}], previous_expert=previous)
    print(json.dumps(router.decide(request).as_dict(), indent=2, ensure_ascii=False))


@router_app.command("kinds")
def kinds_cmd() -> None:
    """List the router kinds serving and A/B tests can name."""
    from router.base import router_kinds

    for kind in router_kinds():
        print(kind)


@router_app.command("digest")
def digest_cmd(
    artifact: Path = typer.Argument(..., help="Router artifact directory."),
) -> None:
    """Verify an artifact and print its digest (sha256:…) for a serve config's `digest:`.

    Every file is checked against the manifest and the encoder's files against router.json; a router
    entry with `digest:` then refuses any other content."""
    from router.artifact import ArtifactError, verify_artifact

    try:
        verified = verify_artifact(artifact)
    except ArtifactError as error:
        _fail(str(error))
    print(verified.digest)
