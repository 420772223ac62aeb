"""`layerline stage …` and `layerline config …`: thin commands over the runtime."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

stage_app = typer.Typer(no_args_is_help=True, help="Run a stage of a split pipeline.")
config_app = typer.Typer(no_args_is_help=True, help="Show resolved settings.")
out = Console()

DEFAULT_CACHE = Path("~/.cache/layerline/stage")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


@stage_app.command("serve")
def stage_serve(
    listen: Annotated[str | None, typer.Option(help="gRPC host:port (default: config, else 127.0.0.1:7700).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where fetched package files go.")] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help="Shared secret every node uses.")] = None,
    admin_token_file: Annotated[Path | None, typer.Option(help="Secret guarding /v1/draft and the dashboard (stage 0).")] = None,
    package: Annotated[str | None, typer.Option(help="Package folder or Hub repo: makes this stage 0.")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="Downstream stage host:port, in order.")] = None,
    split: Annotated[str, typer.Option(help="auto, or ranges like 0:10,10:30 (stage 0 first).")] = "auto",
    http: Annotated[str | None, typer.Option(help="HTTP host:port of the OpenAI API (stage 0).")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config (default ~/.config/layerline/config.toml).")] = None,
    no_draft: Annotated[bool, typer.Option("--no-draft", help="Serve without speculation.")] = False,
    wire_dtype: Annotated[str, typer.Option(help="Activation dtype on the wire: f32, f16, bf16.")] = "f32",
    weights: Annotated[str, typer.Option(help="auto, packed, f32, bf16 or f16.")] = "auto",
    context_length: Annotated[int | None, typer.Option(help="KV cache length (default: the model's, max 4096).")] = None,
    max_sessions: Annotated[int, typer.Option(help="Concurrent sessions each stage keeps.")] = 16,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Wait to be claimed; or, with --package, be stage 0: plan, load the peers, serve HTTP."""
    from layerline.runtime.config import load_config

    _setup_logging(log_level)
    settings = load_config(config)
    listen = listen or settings.stage.listen
    cache = (cache_dir or Path(settings.stage.cache_dir or DEFAULT_CACHE)).expanduser()
    if package is None:
        from layerline.runtime.stage_main import run_stage

        run_stage(listen, cache, auth_token_file)
        return
    from layerline.runtime.stage0_main import Stage0Options, run_stage0

    run_stage0(Stage0Options(
        package=package, peers=peer or [], split=split, http=http or settings.stage.http,
        config=settings, no_draft=no_draft, wire_dtype=wire_dtype, weights=weights,
        context_length=context_length, max_sessions=max_sessions, cache_dir=cache,
        auth_token_file=auth_token_file, admin_token_file=admin_token_file))


@config_app.command("show")
def config_show(
    package: Annotated[str, typer.Option(help="Package folder.")],
    config: Annotated[Path | None, typer.Option(help="TOML config file.")] = None,
    no_draft: Annotated[bool, typer.Option("--no-draft", help="As stage 0 would be started.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the resolved speculation settings and where each value came from."""
    from layerline.packager.package import LayerPackage
    from layerline.runtime.config import load_config
    from layerline.runtime.speculative_settings import resolve_speculative

    manifest = LayerPackage.open(package).manifest
    resolved = resolve_speculative(manifest.model.id, manifest.speculative_decoding,
                                   load_config(config), no_draft=no_draft)
    if as_json:
        out.print_json(json.dumps(resolved.to_json()))
        return
    out.print(f"model: {manifest.model.id}")
    out.print(f"speculation: {'on' if resolved.enabled else 'off'}"
              + (f" ({resolved.reason})" if resolved.reason else ""))
    for key in ("strategy", "type", "draft_model", "window", "initial_window", "min_window",
                "max_window"):
        value = getattr(resolved, key)
        source = resolved.sources.get(key, "-")
        out.print(f"  {key:15} {value!s:40} [{source}]", highlight=False, markup=False, soft_wrap=True)
