"""The `moerge` command line: one entry point, each package contributes its own commands.

Heavy imports (torch, vLLM) happen inside the commands so `moerge --help` stays instant.
"""

from __future__ import annotations

import typer

from merge.cli import register_merge_commands
from moerge.up import register_up_command
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
app.add_typer(ab_app, name="ab")
register_up_command(app)


@app.command("demo")
def demo() -> None:
    """Run the main job: build the tiny expert zoo, merge it into an MoE, load it in vLLM and generate."""
    from rich.console import Console

    from moerge.demo import run_demo

    run_demo(Console())
