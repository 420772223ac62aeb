"""`layerline stage serve`: wait to be claimed, or, with --package, be stage 0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from layerline.runtime.model.session_limit import DEFAULT_MAX_SESSIONS
from layerline.runtime.serve.admission import DEFAULT_DRAIN_S, DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE
from layerline.runtime.serve.body_limit import DEFAULT_MAX_BODY_BYTES
from layerline.runtime.serve.config import LayerlineConfig
from layerline.runtime.serve.http_limits import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_HTTP_CONNECTIONS
from layerline.runtime.stage.claims import DEFAULT_LEASE_S
from layerline.runtime.stage.content_cache import DEFAULT_CACHE_DIR
from layerline.runtime.stage.discovery import DEFAULT_CLUSTER
from layerline.runtime.stage.frame_budget import DEFAULT_FRAME_TIMEOUT_S
from layerline.runtime.stage.frame_transport import ConnectionLimits
from layerline.runtime.stage0.failover import DEFAULT_FAILOVER_S

from .options import ConfigFileOpt, NoDraftOpt, WeightsChoice, WeightsOpt
from .output import format_bytes, log_with_time, out

stage_app = typer.Typer(no_args_is_help=True, help="Run a stage of a split pipeline.")
cache_app = typer.Typer(no_args_is_help=True, help="A stage's content cache of package files.")
stage_app.add_typer(cache_app, name="cache")

PEER_LISTEN = "127.0.0.1:7700"
STAGE0_LISTEN = "127.0.0.1:0"

CacheDirOpt = Annotated[Path | None, typer.Option(help="The stage's cache (default: config, else ~/.cache/layerline/stage).")]


def stage_cache(cache_dir: Path | None, settings: LayerlineConfig) -> Path:
    return (cache_dir or Path(settings.stage.cache_dir or DEFAULT_CACHE_DIR)).expanduser()


@stage_app.command("serve")
def stage_serve(
    listen: Annotated[str | None, typer.Option(help="gRPC host:port: a peer's control and files, stage 0's files (default: config, else 127.0.0.1:7700 for a peer, a free loopback port for stage 0).")] = None,
    advertise: Annotated[str | None, typer.Option(help="Stage 0: HOST:PORT peers fetch package files at (behind NAT or a proxy).")] = None,
    serve_files: Annotated[bool, typer.Option(help="Stage 0: serve the package's files to peers that cannot read it.")] = True,
    file_rate_limit: Annotated[float, typer.Option(help="MB/s this stage sends package files to other stages at most, all together (0: no limit).")] = 0.0,
    cache_dir: CacheDirOpt = None,
    auth_token_file: Annotated[Path | None, typer.Option(help="Shared secret every node uses.")] = None,
    admin_token_file: Annotated[Path | None, typer.Option(help="Secret guarding /v1/draft and the dashboard (stage 0).")] = None,
    package: Annotated[str | None, typer.Option(help="Package folder or Hub repo: makes this stage 0.")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="Downstream stage host:port, in order.")] = None,
    spare: Annotated[list[str] | None, typer.Option(help="Stage 0: a peer host:port that replaces a lost stage (repeat; tried in order). Turns failover on: streams pause, then go on.")] = None,
    failover_seconds: Annotated[float, typer.Option(help="Stage 0: how long a lost stage may take to be replaced by a spare; then requests end with an error and the pipeline is degraded.")] = DEFAULT_FAILOVER_S,
    split: Annotated[str, typer.Option(help="auto (planned from measured layer times and free memory), or ranges like 0:10,10:30 (stage 0 first).")] = "auto",
    http: Annotated[str | None, typer.Option(help="HTTP host:port of the OpenAI API (stage 0).")] = None,
    config: ConfigFileOpt = None,
    no_draft: NoDraftOpt = False,
    tree: Annotated[str | None, typer.Option(help="Stage 0: verify a drafted token tree per step: off, auto (sized by cost) or DEPTH,WIDTH[,NODES] (default: config, else off).")] = None,
    wire_dtype: Annotated[str, typer.Option(help="Activation dtype on the wire: f32, f16, bf16.")] = "f32",
    weights: WeightsOpt = WeightsChoice.auto,
    context_length: Annotated[int | None, typer.Option(help="KV cache length (default: the model's, max 4096).")] = None,
    max_sessions: Annotated[int, typer.Option(help="KV-cache sessions each stage keeps; stage 0 decodes at most this many requests at once.")] = DEFAULT_MAX_SESSIONS,
    max_batch: Annotated[int, typer.Option(help="Requests stage 0 decodes at once, batched in each pass; more queue (--max-queue).")] = DEFAULT_MAX_BATCH,
    lanes: Annotated[int | None, typer.Option(help="Batches in flight through the stages at once (stage 0; default one per stage).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a slot (stage 0); more get 429.")] = DEFAULT_MAX_QUEUE,
    max_body_bytes: Annotated[int, typer.Option(help="Largest HTTP request body (stage 0); larger gets 413.")] = DEFAULT_MAX_BODY_BYTES,
    http_header_timeout: Annotated[float, typer.Option(help="Seconds an HTTP request header may take to arrive whole (stage 0); then the connection is closed.")] = DEFAULT_HEADER_TIMEOUT_S,
    max_http_connections: Annotated[int, typer.Option(help="Open HTTP connections stage 0 serves; more get 503 and are closed.")] = DEFAULT_MAX_HTTP_CONNECTIONS,
    stage_timeout: Annotated[float, typer.Option(help="Seconds a stage may take per frame beyond its measured compute; then the request fails.")] = DEFAULT_FRAME_TIMEOUT_S,
    drain_seconds: Annotated[float, typer.Option(help="After SIGTERM, how long requests in flight may finish (stage 0).")] = DEFAULT_DRAIN_S,
    lease_seconds: Annotated[float, typer.Option(help="How long peers keep stage 0's claim without hearing from it (at most 120).")] = DEFAULT_LEASE_S,
    activation_listen: Annotated[str | None, typer.Option(help="HOST:PORT for activation frames (default: --listen's host, a free port).")] = None,
    activation_advertise: Annotated[str | None, typer.Option(help="HOST:PORT others reach the activation endpoint at (behind NAT or a proxy).")] = None,
    max_connections: Annotated[int, typer.Option(help="Activation connections this stage serves at once; more are refused.")] = ConnectionLimits.max_connections,
    connection_idle_seconds: Annotated[float, typer.Option(help="An activation connection idle this long is closed.")] = ConnectionLimits.idle_s,
    max_hello_connections: Annotated[int, typer.Option(help="Activation connections still in their hello (not yet authenticated); past it the oldest is closed (8 per address).")] = ConnectionLimits.max_greeting,
    frame_memory_mb: Annotated[int, typer.Option(help="MiB of activation frames this stage holds read and unanswered, over all connections; more wait.")] = ConnectionLimits.unanswered_bytes >> 20,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve beyond loopback without --auth-token-file.")] = False,
    cluster: Annotated[str, typer.Option(help="The cluster a peer advertises itself in, and whose peers stage 0 claims with --discover.")] = DEFAULT_CLUSTER,
    announce: Annotated[bool, typer.Option(help="A peer: advertise this stage on the LAN (mDNS, _layerline._tcp) on the interface --listen names.")] = True,
    discover: Annotated[bool, typer.Option("--discover", help="Stage 0: also claim the free stages of --cluster found on the LAN (after any --peer).")] = False,
    discover_seconds: Annotated[float, typer.Option(help="Stage 0: how long --discover looks for stages.")] = 1.5,
    discover_peers: Annotated[int, typer.Option(help="Stage 0: stop looking once this many stages are found (0: look for --discover-seconds).")] = 0,
    trace: Annotated[Path | None, typer.Option(help="Stage 0: write every step of every request to this file, one JSON line each.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Wait to be claimed; or, with --package, be stage 0: plan, load the peers, serve HTTP."""
    from layerline.runtime.serve.config import load_config

    log_with_time(log_level)
    settings = load_config(config)
    listen = listen or settings.stage.listen
    cache = stage_cache(cache_dir, settings)
    if package is None:
        from layerline.runtime.stage.main import run_stage

        run_stage(listen or PEER_LISTEN, cache, auth_token_file, insecure=insecure,
                  limits=ConnectionLimits(max_connections=max_connections, idle_s=connection_idle_seconds,
                                          max_greeting=max_hello_connections,
                                          unanswered_bytes=frame_memory_mb << 20),
                  activation_listen=activation_listen, activation_advertise=activation_advertise,
                  file_rate_limit_mb_s=file_rate_limit, cluster=cluster, announced=announce)
        return
    from layerline.runtime.serve.stage0 import Stage0Options, run_stage0

    run_stage0(Stage0Options(
        package=package, peers=peer or [], spares=spare or [], failover_s=failover_seconds, split=split,
        http=http or settings.stage.http, config=settings, no_draft=no_draft, tree=tree,
        wire_dtype=wire_dtype, weights=weights.value,
        context_length=context_length, max_sessions=max_sessions, max_batch=max_batch, lanes=lanes,
        cache_dir=cache,
        auth_token_file=auth_token_file, admin_token_file=admin_token_file, max_queue=max_queue,
        max_body_bytes=max_body_bytes, header_timeout_s=http_header_timeout,
        max_http_connections=max_http_connections, stage_timeout_s=stage_timeout, drain_s=drain_seconds,
        lease_s=lease_seconds, trace_file=trace, listen=listen or STAGE0_LISTEN, advertise=advertise,
        serve_files=serve_files, file_rate_limit_mb_s=file_rate_limit, insecure=insecure,
        discover=discover, cluster=cluster, discover_seconds=discover_seconds, discover_peers=discover_peers))


@stage_app.command("list")
def stage_list(
    cluster: Annotated[str | None, typer.Option(help="Show only the stages of this cluster (default: every cluster).")] = None,
    seconds: Annotated[float, typer.Option(help="How long to listen for advertisements.")] = 2.0,
    interface: Annotated[list[str] | None, typer.Option(help="An IPv4 address of this machine to look on (repeat; default: every interface).")] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help="Say which stages hold this token.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "warning",
) -> None:
    """The stages advertised on the LAN: cluster, address, version, device, free memory."""
    from zeroconf import InterfaceChoice

    from layerline.runtime.stage.discovery import SERVICE_TYPE, browse, token_fingerprint
    from layerline.runtime.stage.server import read_token

    log_with_time(log_level)
    token = read_token(auth_token_file)
    ads = sorted(browse(interface or InterfaceChoice.All, seconds), key=lambda ad: (ad.cluster, ad.endpoint))
    table = Table(title=f"layerline stages on the LAN{f' in cluster {cluster}' if cluster else ''}")
    for column in ("cluster", "endpoint", "name", "version", "device", "free memory", "auth"):
        table.add_column(column, no_wrap=column in ("endpoint", "free memory"), overflow="fold")
    for ad in ads:
        if cluster is not None and ad.cluster != cluster:
            continue
        auth = "token" if ad.fingerprint else "none"
        if token is not None and ad.fingerprint:
            ours = ad.fingerprint == token_fingerprint(token, ad.cluster, list(ad.addresses), ad.port)
            auth = "our token" if ours else "another token"
        table.add_row(ad.cluster, ad.endpoint, ad.name.removesuffix(f".{SERVICE_TYPE}"), ad.version,
                      ad.device, format_bytes(ad.memory_free_bytes), auth)
    out.print(table)


@cache_app.command("list")
def cache_list(cache_dir: CacheDirOpt = None, config: ConfigFileOpt = None) -> None:
    """What a stage's content cache holds: package views, blobs, unused and partial bytes."""
    from layerline.runtime.serve.config import load_config
    from layerline.runtime.stage.content_cache import ContentCache

    root = stage_cache(cache_dir, load_config(config))
    summary = ContentCache(root).summary()
    table = Table(title=f"packages in {root}")
    for column in ("manifest sha256", "model", "files", "size"):
        table.add_column(column)
    for package in summary.packages:
        table.add_row(package.manifest_sha256[:16], package.model_id, str(package.files),
                      format_bytes(package.bytes))
    out.print(table)
    out.print(f"{summary.blobs} files ({format_bytes(summary.blob_bytes)}); {summary.unused_blobs} in no "
              f"package ({format_bytes(summary.unused_bytes)}); {format_bytes(summary.partial_bytes)} of "
              "broken-off transfers")


@cache_app.command("prune")
def cache_prune(
    package: Annotated[list[str] | None, typer.Option(help="Also remove this package (its manifest sha256, as `list` shows it in full), or `all`.")] = None,
    cache_dir: CacheDirOpt = None,
    config: ConfigFileOpt = None,
) -> None:
    """Remove files no package in the cache uses, broken-off transfers and stale records."""
    from layerline.runtime.serve.config import load_config
    from layerline.runtime.stage.content_cache import ContentCache

    root = stage_cache(cache_dir, load_config(config))
    freed = ContentCache(root).prune(package)
    out.print(f"freed {format_bytes(freed)} in {root}")
