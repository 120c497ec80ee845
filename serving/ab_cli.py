"""`moerge ab report EXPERIMENT`: the A/B report from the decision log (registered in moerge/cli.py).

May import: serving.config, serving.report, sqlalchemy, rich, typer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

ab_app = typer.Typer(
    no_args_is_help=True, help="A/B experiments between routers: reports from the decision log."
)


def parse_weights(text: str) -> dict[str, float]:
    """`control=1,treatment=2` → {"control": 1.0, "treatment": 2.0}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        arm, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not arm.strip() or not weight > 0:
            raise typer.BadParameter(f"--weights: expected ARM=WEIGHT[,ARM=WEIGHT...], got {part!r}")
        out[arm.strip()] = weight
    return out


@ab_app.command("report")
def report_cmd(
    experiment: str = typer.Argument(..., help="experiment name (as in the serve config)"),
    config: Path | None = typer.Option(
        None,
        "--config",
        exists=True,
        dir_okay=False,
        help="serve config: the database URL, arm weights, control",
    ),
    db: str | None = typer.Option(None, "--db", help="database URL (default: the config's decision_log)"),
    weights: str | None = typer.Option(None, "--weights", help="ARM=WEIGHT,... for the sample-ratio check"),
    control: str | None = typer.Option(None, "--control", help="the baseline arm (default: the config's)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    plot: Path | None = typer.Option(None, "--plot", dir_okay=False, help="write a PNG summary here"),
) -> None:
    """Per-arm table, differences against control with significance tests, sample-ratio check."""
    from rich.console import Console
    from sqlalchemy.exc import SQLAlchemyError

    from serving.config import ConfigError, check_db_url, load_config
    from serving.report import build_report, load_experiment, plot_report, print_report

    arm_weights = parse_weights(weights) if weights else None
    url = db
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as err:
            typer.echo(str(err) if err.source else f"invalid config {config}:\n{err}", err=True)
            raise typer.Exit(2) from None
        exp = cfg.experiments.get(experiment)
        if exp is None:
            typer.echo(
                f"{config}: no experiment {experiment!r} (known: {', '.join(cfg.experiments) or 'none'})",
                err=True,
            )
            raise typer.Exit(2)
        arm_weights = arm_weights or {a: arm.weight for a, arm in exp.arms.items()}
        control = control or exp.control
        url = url or cfg.decision_log.resolved_url()
    if url is None:
        typer.echo("give --db URL or --config CONFIG", err=True)
        raise typer.Exit(2)
    try:
        url = check_db_url(url)
        rows, fb = load_experiment(url, experiment)
    except (ValueError, SQLAlchemyError) as err:
        typer.echo(f"cannot read the decision log: {str(err).splitlines()[0]}", err=True)
        raise typer.Exit(1) from None
    report = build_report(experiment, rows, fb, arm_weights, control)
    if plot is not None:
        plot_report(report, rows, plot)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        console = Console() if sys.stdout.isatty() else Console(width=160)  # pipes: no squeezed table
        if not rows:
            console.print(f"no attributed requests for experiment {experiment!r} in the decision log")
        print_report(report, console)
        if plot is not None:
            console.print(f"plot: {plot}")
