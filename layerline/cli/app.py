"""The root of the `layerline` command, and the entry point that turns errors into clean messages."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from layerline.errors import LayerlineError

from .bench import bench_app
from .config import config_app
from .models import models_app
from .output import err
from .pkg import pkg_app
from .run import run
from .stage import stage_app

app = typer.Typer(no_args_is_help=True, help="Serve one model split by layer ranges across machines.")
app.add_typer(pkg_app, name="pkg")
app.add_typer(models_app, name="models")
app.command("run")(run)
app.add_typer(stage_app, name="stage")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def main() -> None:
    """Console-script entry point: run the app, turning LayerlineErrors into clean messages."""
    # SIGTERM unwinds like Ctrl-C, so half-built output is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # Without standalone mode typer returns an exit code (130 on Ctrl-C) instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            if code == 130:
                err.print("interrupted")
            sys.exit(code)
    except LayerlineError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err.print(f"  [bold]fix:[/] {exc.hint}", highlight=False)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own formatting
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
