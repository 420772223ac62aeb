"""`layerline config show`: the speculation settings stage 0 would use, and where each came from."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .options import AsJsonOpt, ConfigFileOpt, NoDraftOpt
from .output import out

config_app = typer.Typer(no_args_is_help=True, help="Show resolved settings.")


@config_app.command("show")
def config_show(
    package: Annotated[str, typer.Option(help="Package folder.")],
    config: ConfigFileOpt = None,
    no_draft: NoDraftOpt = False,
    as_json: AsJsonOpt = False,
) -> None:
    """Print the resolved speculation settings and where each value came from."""
    from layerline.packager.package import LayerPackage
    from layerline.runtime.serve.config import load_config
    from layerline.runtime.stage0.speculation.resolve import resolve_speculation

    manifest = LayerPackage.open(package).manifest
    resolved = resolve_speculation(manifest.model.id, manifest.speculative_decoding,
                                   load_config(config), no_draft=no_draft)
    settings = resolved.to_json()
    if as_json:
        out.print_json(json.dumps(settings))
        return
    out.print(f"model: {manifest.model.id}")
    out.print(f"speculation: {'on' if resolved.enabled else 'off'}"
              + (f" ({resolved.reason})" if resolved.reason else ""))
    for key in ("strategy", "type", "draft_model", "window_policy", "initial_window", "min_window",
                "max_window"):
        source = resolved.sources.get(key, "-")
        out.print(f"  {key:15} {settings[key]!s:40} [{source}]", highlight=False, markup=False,
                  soft_wrap=True)
