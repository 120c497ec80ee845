"""`python -m serving serve CONFIG.yaml`: the `moerge serve` command without the rest of the CLI."""

import typer

from serving.cli import register_serve_commands

app = typer.Typer(pretty_exceptions_enable=False, no_args_is_help=True)
register_serve_commands(app)


@app.callback()
def _main() -> None:
    """moerge serving gateway."""


if __name__ == "__main__":
    app()
