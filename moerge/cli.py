"""The `moerge` command line: one entry point, each package contributes its own commands.

Heavy imports (torch, vLLM) happen inside the commands so `moerge --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from merge.cli import register_merge_commands
from moerge.up import register_up_command
from moerge.zoo.cli import zoo_app
from router.cli import router_app
from serving.ab_cli import ab_app
from serving.cli import register_serve_commands

app = typer.Typer(
    no_args_is_help=True,
    help="moerge: recycle fine-tuned expert LLMs into one serving system "
    "(merge homogeneous experts into an MoE, route between heterogeneous ones, serve over OpenAI's API).",
    pretty_exceptions_enable=False,
)
register_merge_commands(app)
app.add_typer(router_app, name="router")
register_serve_commands(app)
app.add_typer(zoo_app, name="zoo")
app.add_typer(ab_app, name="ab")
register_up_command(app)


@app.command("demo")
def demo(
    tiny: bool = typer.Option(False, "--tiny", help="The fast offline tiny demo."),
    out: Path = typer.Option(Path("runs/zoo"), "--out", help="Where the zoo is built (cached)."),
    data: Path = typer.Option(Path("../shared/data"), "--data", help="The shared data folder."),
    port: int = typer.Option(8000, "--port", help="Port of the gateway."),
    no_serve: bool = typer.Option(False, "--no-serve", help="Build and print the requests, do not serve."),
) -> None:
    """Run the main job: build the demo zoo if absent (cached), then serve it with `moerge serve`."""
    from rich.console import Console

    from moerge.demo import run_demo
    from moerge.zoo.smollm2 import BaseModelError
    from moerge.zoo.splits import DataDirError
    from moerge.zoo.stages import BuildLockedError

    console = Console(stderr=True)
    try:
        run_demo(console, tiny=tiny, out=out, data=data, port=port, serve=not no_serve)
    except (DataDirError, BaseModelError, BuildLockedError) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from err
