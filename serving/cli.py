"""`moerge serve CONFIG.yaml`: registered on the main CLI by `register_serve_commands(app)`."""

from __future__ import annotations

from pathlib import Path

import typer


def register_serve_commands(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        config: Path = typer.Argument(..., exists=True, dir_okay=False, help="serve config YAML"),
        host: str | None = typer.Option(None, help="override server.host"),
        port: int | None = typer.Option(None, help="override server.port"),
        check: bool = typer.Option(False, "--check", help="validate the config (and its paths) and exit"),
    ) -> None:
        """Serve experts behind an OpenAI-compatible API, routing `auto` requests with a router."""
        from serving.config import ConfigError, load_config, missing_paths

        try:
            cfg = load_config(config)
        except ConfigError as err:
            typer.echo(f"invalid config {config}:\n{err}", err=True)
            raise typer.Exit(2) from None
        if host is not None:
            cfg.server.host = host
        if port is not None:
            cfg.server.port = port
        missing = missing_paths(cfg)
        if missing:
            typer.echo("missing paths:\n" + "\n".join(missing), err=True)
            raise typer.Exit(2)
        if check:
            typer.echo(
                f"{config}: ok ({len(cfg.experts)} experts, routing models: "
                f"{', '.join(cfg.routing_models) or 'none'})"
            )
            return
        from serving.server import run

        run(cfg)
