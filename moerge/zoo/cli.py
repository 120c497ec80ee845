"""`moerge zoo build`: the demo expert zoo, one cached command with a progress bar per stage."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

zoo_app = typer.Typer(no_args_is_help=True, help="Build the demo expert zoo (real SmolLM2-135M experts).")


@zoo_app.command("build")
def build_command(
    out: Path = typer.Option(Path("runs/zoo"), "--out", help="Output folder (the zoo layout)."),
    data: Path = typer.Option(
        Path("../shared/data"), "--data", help="The shared data folder (five domain JSONL files)."
    ),
    config: Path | None = typer.Option(None, "--config", help="Zoo recipe YAML overriding the defaults."),
    force: bool = typer.Option(False, "--force", help="Rebuild every stage even if it is up to date."),
) -> None:
    """Build (or bring up to date) the zoo: data splits, SmolLM2 base, dense experts, MoE, a heterogeneous
    expert, the router, held-out NLL, serve.yaml. Stages whose inputs did not change are skipped."""
    from rich.console import Console

    from moerge.zoo.build import build_zoo
    from moerge.zoo.config import ZooConfigError, load_zoo_config
    from moerge.zoo.smollm2 import BaseModelError
    from moerge.zoo.splits import DataDirError
    from moerge.zoo.stages import BuildLockedError

    console = Console(stderr=True)
    try:
        cfg = load_zoo_config(config)
        with zoo_progress(console) as (bar, log):
            summary = build_zoo(out, data, cfg, force=force, bar=bar, log=log)
    except (ZooConfigError, DataDirError, BaseModelError, FileNotFoundError, BuildLockedError) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from err
    typer.echo(json.dumps(summary, indent=2))


class zoo_progress:  # noqa: N801 - used as a context manager
    """A rich Progress whose tasks the stages create: (bar factory, log function)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )

    def __enter__(self) -> tuple[Callable, Callable[[str], None]]:
        self.progress.__enter__()

        def bar(description: str, total: int | None) -> Callable[..., None]:
            task = self.progress.add_task(description, total=total, info="")

            def advance(completed: int, loss: float | None = None, total: int | None = None) -> None:
                fields: dict[str, Any] = {"info": f"loss {loss:.3f}"} if loss is not None else {}
                if total is not None:
                    fields["total"] = total
                if completed and self.progress.tasks[task].total is None and total is None:
                    fields["total"] = completed
                self.progress.update(task, completed=completed, **fields)

            return advance

        return bar, lambda message: self.progress.console.print(message, highlight=False)

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
