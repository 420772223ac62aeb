"""Where commands print: results to stdout, messages and logs to stderr."""

from __future__ import annotations

import logging
import sys

from rich.console import Console

out = Console()
err = Console(stderr=True)


def log_to_stderr(quiet: bool) -> None:
    """One plain line per log event on stderr; only warnings when quiet."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per HTTP request


def log_with_time(level: str) -> None:
    """Timestamped log lines at `level` (debug, info, warning), as a long-running server logs."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def format_bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
