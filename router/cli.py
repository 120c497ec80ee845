"""`moerge router ...`: train and evaluate routers."""

import typer

router_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the sequence-level router.")
