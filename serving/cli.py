"""`moerge serve CONFIG.yaml` and `moerge keys hash`: registered on the main CLI by `register_serve_commands(app)`.

May import: serving (the server, tracing and vLLM modules only inside the commands that use them), typer.
"""

from __future__ import annotations

from pathlib import Path

import typer

from serving.config import ConfigError, ServeConfig, load_config, missing_paths

keys_app = typer.Typer(no_args_is_help=True, help="API keys for the gateway's `auth.keys` section.")


@keys_app.command("hash")
def hash_cmd(
    key: str | None = typer.Argument(None, help="the key (omit: read from stdin, or --generate)"),
    generate: bool = typer.Option(False, "--generate", help="make a new random key and print it too"),
) -> None:
    """Print the sha256 a config stores for a key (the key itself never goes in the config)."""
    import secrets
    import sys

    from serving.auth import hash_key

    if generate:
        key = "sk-moerge-" + secrets.token_urlsafe(32)
        typer.echo(f"key:    {key}")
    elif key is None:
        key = sys.stdin.readline().strip()
    if not key:
        typer.echo("no key given", err=True)
        raise typer.Exit(2)
    typer.echo(f"sha256: {hash_key(key)}" if generate else hash_key(key))


lora_app = typer.Typer(no_args_is_help=True, help="LoRA adapters served as experts (the `lora:` section).")


@lora_app.command("check")
def lora_check(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder"),
    max_lora_rank: int = typer.Option(16, help="the engine's max_lora_rank"),
) -> None:
    """Check an adapter folder the way vLLM will (format, rank, unsupported features)."""
    from serving.lora import check_adapter

    problems = check_adapter(adapter, max_lora_rank)
    for problem in problems:
        typer.echo(f"{adapter}: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{adapter}: ok")


@lora_app.command("zero-adapter")
def lora_zero(
    adapter: Path = typer.Argument(..., exists=True, file_okay=False, help="an adapter of the base"),
    out: Path = typer.Argument(..., help="folder to write the zero adapter to"),
) -> None:
    """Write an adapter shaped like ADAPTER with every weight 0: a remote engine serves its base through
    it (`--lora-modules zero=OUT`, then `zero_adapter: zero` in the family), exact in mixed batches."""
    from serving.lora import write_zero_adapter

    typer.echo(str(write_zero_adapter(adapter, out)))


def check_runtime(cfg: ServeConfig) -> None:
    """Settings that need more than the schema: the decision-log URL from the environment, tracing, the
    in-process experts' tool-call parsers (against the installed vLLM's)."""
    from serving.config import VllmExpert
    from serving.tracing import Tracer
    from serving.vllm_boundary import check_tool_parser

    engines = {f"experts.{n}": e for n, e in cfg.experts.items()}
    engines |= {f"lora.{n}.base": fam.base for n, fam in cfg.lora.items()}
    for where, expert in engines.items():
        if isinstance(expert, VllmExpert) and expert.tool_call_parser is not None:
            if "tool_parser_plugin" in {k.replace("-", "_") for k in expert.engine_args}:
                continue  # a plugin registers its own names
            try:
                check_tool_parser(expert.tool_call_parser, f"{where}.tool_call_parser")
            except ValueError as err:
                raise ConfigError(str(err)) from None

    if cfg.decision_log.enabled:
        try:
            cfg.decision_log.resolved_url()
        except ValueError as err:
            raise ConfigError(str(err) if "decision_log" in str(err) else f"decision_log.{err}") from None
    Tracer(cfg.tracing)


def register_serve_commands(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(lora_app, name="lora")

    @app.command("serve")
    def serve(
        config: Path = typer.Argument(..., exists=True, dir_okay=False, help="serve config YAML"),
        host: str | None = typer.Option(None, help="override server.host"),
        port: int | None = typer.Option(None, help="override server.port"),
        check: bool = typer.Option(False, "--check", help="validate the config (and its paths) and exit"),
    ) -> None:
        """Serve experts behind an OpenAI-compatible API, routing `auto` requests with a router."""
        try:
            cfg = load_config(config)
            check_runtime(cfg)
        except ConfigError as err:
            typer.echo(str(err) if err.source else f"invalid config {config}:\n{err}", err=True)
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
