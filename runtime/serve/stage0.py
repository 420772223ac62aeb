"""`layerline stage serve --package …`: stage 0 brings up the pipeline and serves HTTP."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import mlx.core as mx

from layerline.errors import LayerlineError
from layerline.packager.package import LayerPackage
from layerline.progress import TransferBoard

from ..decode.targets import PREFILL_STEP
from ..model.cpu_kernel import cpu_kernel
from ..model.head import Head
from ..model.kv_cache import SessionStore
from ..model.layer_probe import probe_layer
from ..model.layer_range import LayerRange
from ..model.session_limit import DEFAULT_MAX_SESSIONS
from ..model.tokenizer import end_of_generation_ids, load_tokenizer
from ..model.weights_policy import detect_device, plan_weights
from ..stage.claims import DEFAULT_LEASE_S
from ..stage.content_cache import DEFAULT_CACHE_DIR, ContentCache
from ..stage.discovery import DEFAULT_CLUSTER, Interfaces, check_cluster, interfaces_for
from ..stage.file_service import FileIndex
from ..stage.frame_budget import DEFAULT_FRAME_TIMEOUT_S
from ..stage.main import check_exposure
from ..stage.model import StageModel
from ..stage.prepare import Preparation, PrepareState, fetch_manifest
from ..stage.server import advertised, grpc_server, is_loopback, read_token, serve_files
from ..stage.split_plan import parse_split
from ..stage.wire import wire_dtype
from ..stage0.coordinator import Coordinator, CoordinatorOptions
from ..stage0.failover import DEFAULT_FAILOVER_S
from ..stage0.find_peers import find_peers
from ..stage0.pipeline import Pipeline
from ..stage0.scheduler import BatchScheduler
from ..stage0.spares import SparePool
from ..stage0.speculation.plan import SpeculationPlanner
from ..stage0.speculation.resolve import resolve_speculation
from ..stage0.speculation.settings import SpeculationSettings
from .admin_auth import AdminAuth
from .admission import DEFAULT_DRAIN_S, DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, Admission
from .body_limit import DEFAULT_MAX_BODY_BYTES
from .config import LayerlineConfig
from .dashboard import dashboard_router
from .draft_api import DraftPolicy, draft_router
from .engine import PipelineEngine
from .engine_slot import EngineSlot
from .frontend import create_app
from .http_limits import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_HTTP_CONNECTIONS, guarded_protocol
from .metrics import StageGauge
from .profile import PassProfile

log = logging.getLogger("layerline.stage0")

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class Stage0Options:
    package: str
    peers: list[str] = field(default_factory=list)
    spares: list[str] = field(default_factory=list)  # peers that may replace a lost stage, in order
    failover_s: float = DEFAULT_FAILOVER_S  # how long a lost stage may take to be replaced
    split: str = "auto"
    http: str = "127.0.0.1:8000"
    config: LayerlineConfig = field(default_factory=LayerlineConfig)
    no_draft: bool = False
    tree: str | None = None  # --tree: "off", "auto" or "D,W[,N]", over config and package
    wire_dtype: str = "f32"
    weights: str = "auto"
    context_length: int | None = None
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_batch: int = DEFAULT_MAX_BATCH  # requests decoding at once, their steps batched in each pass
    lanes: int | None = None  # batches in flight through the stages at once (None: one per stage)
    cache_dir: Path = DEFAULT_CACHE_DIR
    auth_token_file: Path | None = None
    admin_token_file: Path | None = None  # guards /v1/draft and the dashboard
    max_queue: int = DEFAULT_MAX_QUEUE  # requests that may wait for a slot beyond the max_sessions decoding
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # an HTTP request header must arrive whole within
    max_http_connections: int = DEFAULT_MAX_HTTP_CONNECTIONS  # open HTTP connections; more get a 503
    stage_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S  # what a stage may take per frame beyond its compute
    drain_s: float = DEFAULT_DRAIN_S
    lease_s: float = DEFAULT_LEASE_S  # how long a peer keeps this stage 0's claim without hearing from it
    trace_file: Path | None = None  # every step of every request, one JSON line each
    listen: str = "127.0.0.1:0"  # where peers fetch package files from this stage
    advertise: str | None = None  # the address peers are told for it (behind NAT or a proxy)
    serve_files: bool = True
    file_rate_limit_mb_s: float = 0.0  # 0: no limit
    insecure: bool = False  # serve files beyond loopback without an auth token
    discover: bool = False  # also claim the free stages of `cluster` found on the LAN
    cluster: str = DEFAULT_CLUSTER
    discover_seconds: float = 1.5  # how long to look for them
    discover_peers: int = 0  # stop looking once this many are found (0: look the whole time)


def _open_package(ref: str, cache_dir: Path) -> LayerPackage:
    """The package stage 0 plans from: the local folder, or the manifest fetched from the Hub."""
    return LayerPackage.open(fetch_manifest(ref, cache_dir))


def _draft_roots(options: Stage0Options) -> list[Path]:
    """Where `PUT /v1/draft` may load local drafts from: the config's roots, else the folder that
    holds the served package (drafts usually sit beside it)."""
    if options.config.admin.draft_roots:
        return [Path(root) for root in options.config.admin.draft_roots]
    package = Path(options.package).expanduser()
    return [package.resolve().parent] if package.is_dir() else []


def _materialize_stage0(ref: str, start: int, end: int, cache_dir: Path, index: FileIndex) -> LayerPackage:
    """Fetch and verify stage 0's own layers plus embedding, head and tokenizer, with a progress bar."""
    prep = Preparation(ref, start, end, stage0=True, cache_dir=cache_dir, index=index).start()
    with TransferBoard() as board:
        while (report := prep.wait(0.2)).state is PrepareState.PREPARING:
            board.show("stage 0", f"stage 0 layers {start}..{end}", report.bytes_present, report.bytes_total)
        board.show("stage 0", f"stage 0 layers {start}..{end}", report.bytes_present, report.bytes_total)
    if report.state is not PrepareState.READY or prep.package is None:
        raise LayerlineError(f"stage 0 could not prepare layers {start}..{end}: {report.error}")
    log.info("event=stage_prepared stage=0 bytes=%d hashed=%d sources=%s", report.bytes_total,
             report.bytes_hashed, ",".join(f"{k}:{v[0]}" for k, v in report.sources.items()) or "-")
    return prep.package


class Stage0:
    """Everything stage 0 runs, wired together. Building it starts nothing: `start()` serves the
    package's files to the peers and readies the coordinator; `serve()` then serves HTTP and
    brings up the pipeline until shutdown."""

    def __init__(self, options: Stage0Options) -> None:
        self.options = options
        self.cache_dir = options.cache_dir.expanduser()
        self.token = read_token(options.auth_token_file)
        http_host = options.http.rpartition(":")[0]
        admin_token = read_token(options.admin_token_file, "--admin-token-file")
        self.admin = AdminAuth(admin_token, http_loopback=is_loopback(http_host),
                               allowed_hosts=options.config.admin.allowed_hosts)
        if not self.admin.enabled:
            log.warning("event=admin_api_off http=%s reason=no --admin-token-file beyond loopback: "
                        "/v1/draft and the dashboard answer 403", options.http)
        self.admission = Admission(min(options.max_batch, options.max_sessions), options.max_queue)
        self.profile = PassProfile()
        # Only the manifest is read here (for a Hub ref, fetched): it names the model, its
        # context and its speculation, and a bad ref fails before anything is bound.
        self.package = _open_package(options.package, self.cache_dir)
        self.files = FileIndex(ContentCache(self.cache_dir))
        self.draft_policy = DraftPolicy(_draft_roots(options), options.config.admin.hub_drafts)
        manifest = self.package.manifest
        self.speculative: SpeculationSettings = resolve_speculation(
            manifest.model.id, manifest.speculative_decoding, options.config, no_draft=options.no_draft,
            tree=options.tree)
        log.info("event=speculation enabled=%s reason=%s settings=%s", self.speculative.enabled,
                 self.speculative.reason, self.speculative.to_json())
        model_context = int(manifest.config.get("max_position_embeddings") or DEFAULT_CONTEXT)
        self.context_length = options.context_length or min(model_context, DEFAULT_CONTEXT)
        self.split = None if options.split == "auto" else parse_split(options.split, manifest.num_layers)
        strategies = manifest.speculative_decoding.strategies if manifest.speculative_decoding else {}
        self.speculation = SpeculationPlanner(
            self.speculative, target_fingerprint=manifest.tokenizer.fingerprint,
            cache_dir=self.cache_dir, weights=options.weights,
            calibrations={name: s.calibration for name, s in strategies.items() if s.calibration is not None})
        self.peers = list(options.peers)  # --peer, then what --discover finds (in start())
        self.slot = EngineSlot(manifest.model.id, self.context_length,
                               int(manifest.config.get("vocab_size") or 0), self.status,
                               self.health, self.confirm_health)
        self._coordinator: Coordinator | None = None  # made by start(): it needs the file server's address
        # Where a lost stage's replacement comes from (None: no failover): the --spare peers, and
        # with --discover the free stages of the cluster found when a stage is lost.
        self.spares = (SparePool(options.spares, find=self._find_spare if options.discover else None)
                       if options.spares or options.discover else None)
        self.file_server: grpc.Server | None = None
        self._board: TransferBoard | None = None  # the peers' preparation bars, during bring-up
        self.started_at: float | None = None
        self.local: StageModel | None = None  # stage 0's own layers, once loaded
        self.engine: PipelineEngine | None = None
        self.scheduler: BatchScheduler | None = None

    def start(self) -> Stage0:
        """Serve the package's files to the peers and make the coordinator that will claim them."""
        options = self.options
        if options.trace_file is not None:
            self.profile.trace_to(options.trace_file)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.file_server, file_source = self._serve_files()
        if options.discover:
            self.peers += self._discover()
        self._coordinator = Coordinator(self.package, CoordinatorOptions(
            package_ref=options.package, peers=list(self.peers), split=self.split,
            wire_dtype=wire_dtype(options.wire_dtype), token=self.token,
            context_length=self.context_length, max_sessions=options.max_sessions,
            max_batch_tokens=PREFILL_STEP, weight_format=options.weights,
            frame_timeout_s=options.stage_timeout_s, lease_s=options.lease_s,
            heartbeat_s=min(2.0, options.lease_s / 4), file_source=file_source,
            failover_s=options.failover_s),
            on_change=self._show_progress, spares=self.spares, prober=probe_layer)
        self.files.serve_package(self._coordinator.manifest_sha256, self.package)
        self.started_at = time.time()
        return self

    def _discover(self) -> list[str]:
        """The free stages of the cluster on the LAN: on every interface with a token or
        --insecure, else only on the one --listen names."""
        options = self.options
        check_cluster(options.cluster)
        found = find_peers(options.cluster, self.token, self._interfaces(), options.discover_seconds,
                           want=options.discover_peers, exclude=frozenset(options.peers))
        if found:
            log.info("event=discovery cluster=%s found=%s", options.cluster, ",".join(found))
        else:
            log.warning("event=discovery cluster=%s found=- reason=no free stage of the cluster holding "
                        "our token answered within %.1f s", options.cluster, options.discover_seconds)
        return found

    def _find_spare(self, exclude: frozenset[str]) -> list[str]:
        """A free stage of the cluster to replace a lost one (the first found), none of `exclude`."""
        return find_peers(self.options.cluster, self.token, self._interfaces(),
                          self.options.discover_seconds, want=1, exclude=exclude | set(self.peers))

    def _interfaces(self) -> Interfaces:
        """Where discovery looks: every interface with a token or --insecure, else --listen's."""
        wide = self.token is not None or self.options.insecure
        return interfaces_for("" if wide else self.options.listen.rpartition(":")[0], wide)

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator of the peers, once `start()` has made it."""
        if self._coordinator is None:
            raise LayerlineError("stage 0 has not started", hint="call Stage0.start() before serving")
        return self._coordinator

    def _show_progress(self) -> None:
        board = self._board
        if board is None:
            return
        for peer in self.coordinator.peers:
            if peer.bytes_total:
                board.show(str(peer.index), f"stage {peer.index} layers {peer.start}..{peer.end}",
                           peer.bytes_present, peer.bytes_total)

    def _serve_files(self) -> tuple[grpc.Server | None, str]:
        """Serve the package's files to the peers (PackageFiles on --listen); the server and the
        address peers are told, or (None, "") with --no-serve-files."""
        if not self.options.serve_files:
            return None, ""
        check_exposure(self.options.listen, self.token, self.options.insecure)
        server, endpoint = grpc_server(self.options.listen, self.token)
        serve_files(server, self.files, "0", self.options.file_rate_limit_mb_s)
        server.start()
        host, _, port = endpoint.rpartition(":")
        source = self.options.advertise or advertised(host, int(port))
        log.info("event=serving_files listen=%s advertised=%s rate_limit_mb_s=%s", endpoint, source,
                 self.options.file_rate_limit_mb_s or "none")
        return server, source

    def bring_up(self) -> None:
        """Load every peer, then stage 0's own range, embedding, head and tokenizer.

        The draft loads in the background meanwhile; requests speculate once it is ready.
        """
        self.speculation.start()
        with TransferBoard() as self._board:
            self.coordinator.bring_up()
        self._board = None
        try:
            self._load_local()
        except BaseException:
            self.coordinator.shutdown()  # every claimed peer is released when stage 0 cannot start
            raise

    def _load_local(self) -> None:
        start, end = self.coordinator.stage0_range
        package = _materialize_stage0(self.options.package, start, end, self.cache_dir, self.files)
        manifest = package.manifest
        files = manifest.layer_files(start, end)
        plan = plan_weights(self.options.weights, manifest, files, detect_device())
        layers = LayerRange.load(package, start, end, plan)
        local = StageModel(layers, SessionStore(layers.make_cache, max_sessions=self.options.max_sessions),
                           self.context_length, getattr(mx, plan.compute_dtype))
        head = Head.load(package, plan)
        tokenizer = load_tokenizer(package)
        # One number bounds a prompt's chunk, a pass's rows and a frame's: PREFILL_STEP (the
        # peers are told it at Load, as BatchConfig.max_batch_tokens).
        pipeline = Pipeline(head, local, first_peer=self.coordinator.first_endpoint(),
                            wire_dtype=wire_dtype(self.options.wire_dtype),
                            hidden_size=int(manifest.config["hidden_size"]), max_tokens=PREFILL_STEP,
                            token=self.token, on_stage_error=self.coordinator.mark_down,
                            frame_timeout_s=self.options.stage_timeout_s * max(1, len(self.peers)),
                            failover=self.coordinator.failover if self.spares is not None else None)
        self.local = local
        self.scheduler = BatchScheduler(pipeline, lanes=self._lanes(), max_batch=self.admission.max_active,
                                        max_rows=PREFILL_STEP)
        self.engine = PipelineEngine(
            manifest, tokenizer, pipeline, context_length=self.context_length,
            end_ids=end_of_generation_ids(tokenizer, package), prefill_step=PREFILL_STEP,
            speculation=self.speculation, status=self.status, ready=lambda: self.coordinator.ready,
            confirm_health=self.confirm_health,
            admission=self.admission, scheduler=self.scheduler, profile=self.profile)
        log.info("event=ready model=%s stage0_layers=%d..%d peers=%d %s", manifest.model.id, start, end,
                 len(self.peers), plan.describe())

    def _lanes(self) -> int:
        """Batches in flight at once: one per stage, so that every stage computes one; but one
        when every stage runs on this machine, whose cores they share (a second batch would
        only split the first)."""
        if self.options.lanes:
            return self.options.lanes
        peers = self.peers
        if all(is_loopback(peer.rpartition(":")[0]) for peer in peers):
            return 1
        return 1 + len(peers)

    def status(self) -> dict[str, Any]:
        manifest = self.package.manifest
        start, end = self.coordinator.stage0_range
        local = self.local
        placement = self.coordinator.placement
        stage0 = {"stage": 0, "endpoint": "local", "layers": [start, end],
                  "state": "ready" if self.engine is not None else "loading",
                  "sessions": local.session_count() if local is not None else 0,
                  "kv_cache_bytes": local.kv_cache_bytes() if local is not None else 0}
        return {
            "model": manifest.model.id,
            "package": self.options.package,
            "layers": manifest.num_layers,
            "run_id": self.coordinator.run_id,
            "coordinator_id": self.coordinator.coordinator_id,
            "term": self.coordinator.term,
            "ready": self.coordinator.ready and self.engine is not None,
            "health": self.health(),
            "pipeline": {**self.coordinator.failover.to_json(), "failover": self.spares is not None,
                         "failover_s": self.options.failover_s,
                         "spares": self.spares.candidates() if self.spares is not None else []},
            "split": [[s["layers"][0], s["layers"][1]] for s in [stage0, *self.coordinator.status()]],
            "placement": placement.to_json() if placement is not None else None,
            "stages": [stage0, *self.coordinator.status()],
            "wire_dtype": self.options.wire_dtype,
            "cpu_kernel": cpu_kernel().to_json(),
            "context_length": self.context_length,
            "speculative": self.speculation.to_json(),
            "profile": self.profile.to_json(),
            "requests": {"active": self.admission.active, "queued": self.admission.waiting,
                         "max_active": self.admission.max_active, "max_queue": self.admission.max_queue},
            "batching": self.batch_state(),
            "uptime_s": round(time.time() - self.started_at, 1) if self.started_at is not None else 0.0,
        }

    def health(self) -> str:
        """ok; recovering (a lost stage is being replaced) or degraded (none replaced it in time);
        else unavailable (loading, or a stage down without a failover)."""
        if self.coordinator.ready and self.engine is not None:
            return "ok"
        state = self.coordinator.failover.state
        return state if state != "ok" else "unavailable"

    def confirm_health(self) -> tuple[str, str | None]:
        """health() after asking every stage for its claim now (a claim lost since the last
        heartbeat counts at once), and why it is not ok (None when it is)."""
        if self.engine is None:
            return self.health(), "stage 0 is still bringing up the pipeline"
        reason = self.coordinator.confirm()
        return self.health(), reason

    def batch_state(self) -> dict[str, Any] | None:
        """The scheduler's passes and queue, and how many requests speculate (None until it runs)."""
        if self.scheduler is None or self.engine is None:
            return None
        return {**self.scheduler.to_json(), "speculating": self.engine.speculating}

    def stage_states(self) -> list[StageGauge]:
        return [StageGauge(str(s["stage"]), s["endpoint"], s["state"] == "ready", s["sessions"],
                           s["kv_cache_bytes"]) for s in self.status()["stages"]]

    def app(self) -> Any:
        """The HTTP app: the OpenAI API, the draft API and the dashboard."""
        app = create_app(self.slot, stage_states=self.stage_states, admission=self.admission,
                         batching=self.batch_state, max_body_bytes=self.options.max_body_bytes)
        app.include_router(draft_router(self.speculation, self.admin, self.draft_policy))
        app.include_router(dashboard_router(self.admin))
        return app

    def serve(self) -> None:
        """Once started: serve HTTP at once and bring up the pipeline meanwhile; until SIGINT or
        SIGTERM, then drain, stop every request and release the peers. A bring-up that fails stops
        HTTP and is raised."""
        import uvicorn

        coordinator = self.coordinator  # one not started is refused here, before HTTP listens
        host, _, port = self.options.http.rpartition(":")
        app = self.app()
        protocol = guarded_protocol(self.options.header_timeout_s, self.options.max_http_connections)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning",
                                               timeout_graceful_shutdown=self.options.drain_s,
                                               http=protocol))
        failure: list[BaseException] = []

        def bring_up() -> None:
            try:
                self.bring_up()
            except BaseException as exc:  # raised on the main thread once HTTP has stopped
                failure.append(exc)
                server.should_exit = True
                return
            self.slot.engine = self.engine
            admin = ("required" if self.admin.required
                     else "off" if not self.admin.enabled else "loopback only")
            print(f"stage 0 serving {self.package.manifest.model.id} on http://{host}:{port} "
                  f"(dashboard at /, admin token {admin})", flush=True)

        original_exit = server.handle_exit
        cut_short = threading.Timer(self.options.drain_s, self._stop_engine)
        cut_short.daemon = True

        def handle_exit(sig: int, frame: Any) -> None:
            # New requests are refused at once; those in flight get drain_s, then end.
            log.info("event=stopping drain_s=%.1f active=%d", self.options.drain_s, self.admission.active)
            self.admission.close()
            if cut_short.ident is None:  # not started by an earlier signal
                cut_short.start()
            original_exit(sig, frame)

        server.handle_exit = handle_exit  # type: ignore[method-assign]
        # uvicorn raises the signal it stopped on again once it is done; by then the stop is
        # clean, so that second delivery must not turn into a failing exit code.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        log.info("event=bringing_up status=http://%s:%s/v1/status", host, port)
        threading.Thread(target=bring_up, name="bring-up", daemon=True).start()
        try:
            server.run()
        finally:
            cut_short.cancel()
            self._stop_engine()
            if not failure:  # a failed bring-up has released every stage already
                coordinator.shutdown()
            if self.file_server is not None:
                self.file_server.stop(grace=1.0)
            log.info("event=stopped")
        if failure:
            raise failure[0]

    def _stop_engine(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


def run_stage0(options: Stage0Options) -> None:
    """Serve HTTP and bring up the pipeline until interrupted; on failure, every stage is released."""
    Stage0(options).start().serve()
