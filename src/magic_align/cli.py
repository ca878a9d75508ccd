"""The `magic` command. Thin by design: parse arguments, load the configuration, call one stage function.

Each stage lives in its own module with one entry function; this file only wires them to subcommands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from magic_align.config import ConfigError, RunConfig, dump_config, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Align diffusion models with expert checklists (MAGIC).")
config_app = typer.Typer(no_args_is_help=True, help="Show and check configurations.")
app.add_typer(config_app, name="config")
console = Console(stderr=True)

ConfigArg = Annotated[str, typer.Argument(help="A TOML file or a preset name (paper, tiny, demo).")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a setting, e.g. --set sample.strength=0.5 (repeatable).")
]


def load(config: str, overrides: list[str] | None) -> RunConfig:
    """Load a configuration or exit with the user-facing message (no traceback)."""
    try:
        return load_config(config, overrides or [])
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(2) from None


@config_app.command("show")
def config_show(config: ConfigArg = "paper", set_: SetOpt = None) -> None:
    """Print the resolved configuration as TOML (every key, with presets and overrides applied)."""
    typer.echo(dump_config(load(config, set_)))


# Stage commands are added below, one per stage module.
