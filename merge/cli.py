"""`moerge merge` and `moerge tune-gates`: the offline half of recycling experts.

May import: merge (inside the commands: torch loads only when a command runs), rich, typer.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

err_console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def merge_command(
    recipe: Path | None = typer.Argument(
        None, help="Merge recipe (YAML): base, experts, shared-weight method, gate init."
    ),
    out_dir: Path | None = typer.Argument(
        None, help="Output folder; written beside itself and renamed when complete."
    ),
    check: Path | None = typer.Option(
        None,
        "--check",
        help="Only check that vLLM's loader for DIR's class would load every tensor and fill every "
        "parameter (from config.json and the safetensors headers; no vLLM started). Exit 1 if not.",
        metavar="DIR",
    ),
    dense: bool = typer.Option(
        False, "--dense", help="Write a dense merge (FFNs merged too) instead of an MoE."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it already exists."),
) -> None:
    """Merge fine-tunes of one base into an MoE checkpoint that vLLM loads natively.

    Llama/Mistral experts become MixtralForCausalLM, Qwen2 experts Qwen2MoeForCausalLM, Qwen3 experts
    Qwen3MoeForCausalLM. Every expert's FFN becomes one MoE expert per layer; attention, embeddings and
    norms are merged with the recipe's method (linear, task_arithmetic, ties, dare_linear, dare_ties);
    each layer's gate is initialised from the experts' data. The output passes the load-completeness
    check before it is put in place. Prints the merge report (also saved as merge-report.json).
    `moerge merge --check DIR` checks any checkpoint instead.
    """
    if check is not None:
        _check_command(check)
        return
    if recipe is None or out_dir is None:
        err_console.print("[red]error:[/red] give RECIPE and OUT_DIR (or --check DIR)")
        raise typer.Exit(2)
    from merge.build import merge_experts
    from merge.checkpoint import CheckpointError
    from merge.completeness import LoadCheckError
    from merge.recipe import RecipeError, load_recipe

    try:
        spec = load_recipe(recipe)
        with _progress() as bar:
            task = bar.add_task("merging layers", total=None)

            def tick(stage: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            report = merge_experts(
                spec, out_dir, dense=dense, overwrite=overwrite, progress=tick, recipe_text=recipe.read_text()
            )
    except (RecipeError, CheckpointError, LoadCheckError, FileExistsError, FileNotFoundError) as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(2) from err
    summary = {
        k: report[k]
        for k in (
            "mode",
            "architecture",
            "dense_layers",
            "experts",
            "gate_init",
            "mean_own_share",
            "unused_experts",
            "seconds",
            "peak_rss_mib",
        )
    }
    typer.echo(json.dumps(summary, indent=2))
    err_console.print(f"[green]wrote[/green] {out_dir}")


def _check_command(folder: Path) -> None:
    from merge.completeness import LoadCheckError, check_checkpoint

    try:
        result = check_checkpoint(folder)
    except LoadCheckError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(2) from err
    typer.echo(json.dumps(result.summary(), indent=2))
    if not result.ok:
        try:
            result.raise_if_incomplete()
        except LoadCheckError as err:
            err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(1)
    err_console.print(f"complete: {folder} loads as {result.architecture}", markup=False, highlight=False)


def tune_gates_command(
    moe_dir: Path = typer.Argument(..., help="An MoE folder written by `moerge merge`."),
    out_dir: Path = typer.Argument(..., help="Output folder for the checkpoint with tuned gates."),
    recipe: Path = typer.Option(..., "--recipe", help="The recipe whose experts' data labels the tokens."),
    steps: int = typer.Option(50, min=1, help="Optimizer steps."),
    lr: float = typer.Option(1e-2, min=0.0, help="Learning rate of the gate weights."),
    routing_weight: float = typer.Option(
        1.0, min=0.0, help="Weight of the routing cross-entropy next to LM loss."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it already exists."),
) -> None:
    """Train only the gates of a merged MoE on the experts' data, everything else frozen.

    MergeME's router fine-tuning baseline: language-modelling loss plus a cross-entropy that asks each
    layer's gate to send an expert's tokens to that expert. Writes a new checkpoint; the input is untouched.
    """
    from merge.recipe import RecipeError, load_recipe
    from merge.tune import tune_gates

    try:
        spec = load_recipe(recipe)
        with _progress() as bar:
            task = bar.add_task("tuning gates", total=steps)
            report = tune_gates(
                moe_dir,
                out_dir,
                spec,
                steps=steps,
                lr=lr,
                routing_weight=routing_weight,
                overwrite=overwrite,
                progress=lambda done: bar.update(task, completed=done),
            )
    except (RecipeError, FileExistsError, FileNotFoundError, ValueError) as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}")  # `experts[text]` is no markup
        raise typer.Exit(2) from err
    typer.echo(json.dumps(report, indent=2))


def register_merge_commands(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
    app.command("tune-gates")(tune_gates_command)
