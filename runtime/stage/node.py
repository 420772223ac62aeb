"""One stage's control state machine: Claim → Prepare → Inventory → Load → Ready, fenced.

Plain Python over protobuf messages, so it is tested without gRPC; the servicers
in stage_server.py only translate calls to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from layerline import __version__
from layerline.errors import LayerlineError
from layerline.packager.digest import is_sha256
from layerline.packager.package import LayerPackage
from layerline.proto import stage_control_pb2 as pb

from ..model.host_memory import host_memory
from ..model.layer_shape import LayerShape, LayerTiming
from ..model.session_limit import DEFAULT_MAX_SESSIONS
from .claims import MAX_LEASE_S, ClaimRejected, ClaimTable, RejectReason
from .client import ActivationAddress, resolve_advertised
from .content_cache import ContentCache
from .file_service import FileIndex
from .frame_budget import DEFAULT_FRAME_TIMEOUT_S, FrameBudget
from .prepare import Preparation, PrepareState, local_layer_count
from .probe_messages import probe_message, shape_from_message
from .wire import DEFAULT_MAX_FRAME_ROWS, FrameLimits, Rows

MAX_ID_CHARS = 256  # a coordinator_id or run_id: every later Status carries the holder's
MAX_PROBED_SHAPES = 16  # layer probes remembered; a caller sending shape after shape evicts the oldest

log = logging.getLogger("layerline.stage")

MAX_CLOCK_SKEW_S = 600.0  # how far ahead of this stage's clock a coordinator's term may be


def max_term(now_s: float) -> int:
    """The highest term a Claim may carry now: terms are unix milliseconds (plus clock skew)."""
    return int((now_s + MAX_CLOCK_SKEW_S) * 1000)

_REASONS = {
    RejectReason.CLAIMED_BY_OTHER: pb.REJECT_REASON_CLAIMED_BY_OTHER,
    RejectReason.STALE_TERM: pb.REJECT_REASON_STALE_TERM,
    RejectReason.NOT_CLAIMED: pb.REJECT_REASON_NOT_CLAIMED,
}
_INVENTORY_STATES = {
    PrepareState.PREPARING: pb.INVENTORY_STATE_PREPARING,
    PrepareState.READY: pb.INVENTORY_STATE_READY,
    PrepareState.FAILED: pb.INVENTORY_STATE_FAILED,
}


class RangeModel(Protocol):
    """What a stage needs of the runtime: its layers over per-session KV caches."""

    hidden_size: int

    def forward_batch(self, rows: list[Rows], hidden: Any) -> Any: ...
    def drop_session(self, session_id: str) -> None: ...
    def memory_bytes(self) -> int: ...
    def session_count(self) -> int: ...
    def kv_cache_bytes(self) -> int: ...


@dataclass(frozen=True)
class LoadOptions:
    start: int
    end: int
    stage_index: int
    stage_count: int
    downstream: str
    wire_dtype: int
    context_length: int
    max_sessions: int
    max_batch_tokens: int
    weight_format: str
    frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S


ModelLoader = Callable[[LayerPackage, LoadOptions], RangeModel]
LayerProber = Callable[[LayerShape], LayerTiming]  # times a synthetic layer (`layer_probe.probe_layer`)


@dataclass
class LoadedStage:
    model: RangeModel
    options: LoadOptions
    limits: FrameLimits
    downstream_budget: FrameBudget  # how long the next stage may take per frame
    downstream: ActivationAddress | None  # where the next stage takes frames; None on the last


class StageNode:
    """A stage that waits to be claimed, then prepares and loads the range it is given."""

    def __init__(self, endpoint: str, cache_dir: Path, loader: ModelLoader,
                 clock: Callable[[], float] = time.monotonic, token: str | None = None,
                 prober: LayerProber | None = None) -> None:
        self.endpoint = endpoint
        self.token = token  # the shared secret, presented to the next stage too
        self.activation_endpoint = endpoint  # where activation frames go; the server sets it
        self.cache_dir = cache_dir
        self.files = FileIndex(ContentCache(cache_dir))  # what this stage serves to other stages
        self.loader = loader
        self.claims = ClaimTable(clock)
        self._clock = clock
        self._lock = threading.Lock()
        self.preparation: Preparation | None = None
        self.loaded: LoadedStage | None = None
        self._loaded_run: str | None = None  # the run whose Load built `loaded`
        self._loading = False
        self._failure = ""
        self._lapse_logged = False
        # Serializes compute: mlx evaluation from several threads at once gains nothing on one device.
        self.compute_lock = threading.Lock()
        self.prober = prober  # None: this stage answers a probe with an error (planned by memory)
        self._probes: dict[LayerShape, LayerTiming | str] = {}  # per shape: its timing, or why none

    # ------------------------------------------------------------ dispatch

    def handle(self, request: pb.StageControlRequest, caller_host: str = "") -> pb.StageControlResponse:
        """Answer one control request; `caller_host` is the address it came from (for ":port" sources)."""
        kind = request.WhichOneof("request")
        if kind is None:
            return self._reject(pb.REJECT_REASON_BAD_REQUEST, "empty control request: set one of "
                                "claim, prepare, inventory, load, release, status")
        try:
            if kind == "status":
                return pb.StageControlResponse(status=self.status())
            if kind == "claim":
                return self._claim(request)
            if kind == "release":
                self.claims.release(request.coordinator_id, request.term)
                self.unload()
                self._cancel_preparation()
                log.info("stage=%s event=released coordinator=%s", self.endpoint, request.coordinator_id)
                return pb.StageControlResponse(released=pb.Released())
            with self.claims.answering(request.coordinator_id, request.term):
                return self._fenced(kind, request, caller_host)
        except ClaimRejected as exc:
            holder = exc.holder
            remaining = max(0, int((holder.expires_at - self._clock()) * 1000)) if holder else 0
            return pb.StageControlResponse(rejected=pb.Rejected(
                reason=_REASONS[exc.reason], message=exc.message,
                holder_coordinator_id=holder.coordinator_id if holder else "",
                holder_term=holder.term if holder else 0, lease_remaining_ms=remaining))

    def _fenced(self, kind: str, request: pb.StageControlRequest,
                caller_host: str) -> pb.StageControlResponse:
        if kind == "prepare":
            return self._prepare(request.prepare, caller_host)
        if kind == "inventory":
            return pb.StageControlResponse(inventory=self.inventory())
        if kind == "load":
            return self._load(request.load)
        raise AssertionError(f"unhandled control request {kind}")

    @staticmethod
    def _reject(reason: int, message: str) -> pb.StageControlResponse:
        return pb.StageControlResponse(rejected=pb.Rejected(reason=reason, message=message))

    # ------------------------------------------------------------ requests

    def _claim(self, request: pb.StageControlRequest) -> pb.StageControlResponse:
        claim = request.claim
        if not request.coordinator_id or claim.lease_duration_ms == 0 or not claim.package.ref:
            return self._reject(pb.REJECT_REASON_BAD_REQUEST,
                                "Claim needs coordinator_id, package.ref and lease_duration_ms")
        if max(len(request.coordinator_id), len(request.run_id)) > MAX_ID_CHARS:
            return self._reject(pb.REJECT_REASON_BAD_REQUEST,
                                f"coordinator_id and run_id are at most {MAX_ID_CHARS} characters (every "
                                "Status repeats them)")
        if claim.package.manifest_sha256 and not is_sha256(claim.package.manifest_sha256):
            return self._reject(pb.REJECT_REASON_BAD_REQUEST,
                                "Claim's package.manifest_sha256 must be 64 lowercase hex digits (or empty), "
                                f"got {claim.package.manifest_sha256[:80]!r}")
        if claim.lease_duration_ms > MAX_LEASE_S * 1000:
            return self._reject(pb.REJECT_REASON_BAD_REQUEST,
                                f"lease_duration_ms {claim.lease_duration_ms} is above the most a stage "
                                f"grants, {int(MAX_LEASE_S * 1000)} ms")
        latest = max_term(time.time())
        if not 1 <= request.term <= latest:
            return self._reject(pb.REJECT_REASON_BAD_REQUEST,
                                f"term {request.term} is out of range: a term is 1 to {latest} (unix "
                                f"milliseconds now plus {MAX_CLOCK_SKEW_S:.0f} s of clock skew)")
        # Probed before the claim is taken, so that the lease granted runs from the answer.
        probe = self.probe(shape_from_message(claim.probe_shape)) if claim.HasField("probe_shape") else None
        held, preempted = self.claims.claim(
            request.coordinator_id, request.term, request.run_id, claim.package.ref,
            claim.package.manifest_sha256, claim.lease_duration_ms / 1000)
        if preempted is not None or (self.loaded and self._loaded_run != held.run_id):
            self.unload()  # a new run owns the stage: drop the old one's model and files state
        if preempted is not None:
            self._cancel_preparation()
        log.info("stage=%s event=claimed coordinator=%s term=%d run=%s", self.endpoint,
                 held.coordinator_id, held.term, held.run_id)
        accepted = pb.ClaimAccepted(
            lease_duration_ms=claim.lease_duration_ms,
            lease_expires_unix_ms=int((time.time() + held.lease_s) * 1000),
            preempted_coordinator_id=preempted.coordinator_id if preempted else "")
        if probe is not None:
            accepted.probe.CopyFrom(probe)
        return pb.StageControlResponse(claim_accepted=accepted)

    def probe(self, shape: LayerShape) -> pb.LayerProbe:
        """Time a synthetic layer of `shape`, once per shape: later claims get the first result."""
        free = host_memory().available
        if self.prober is None:
            return probe_message(None, free, "this stage does not probe layers")
        known = self._probes.get(shape)
        if known is None:
            try:
                with self.compute_lock:
                    known = self.prober(shape)
                log.info("stage=%s event=probed one_row_us=%d batch_us=%d rows=%d weights=%s",
                         self.endpoint, known.one_row_s * 1e6, known.batch_s * 1e6, known.batch_rows,
                         known.weight_format)
            except (LayerlineError, ValueError, RuntimeError) as exc:  # a shape mlx cannot build
                known = str(exc)
                log.warning("stage=%s event=probe_failed error=%s", self.endpoint, known)
            if len(self._probes) >= MAX_PROBED_SHAPES:
                self._probes.pop(next(iter(self._probes)))
            self._probes[shape] = known
        if isinstance(known, str):
            return probe_message(None, free, known)
        return probe_message(known, free)

    def _prepare(self, prepare: pb.Prepare, caller_host: str) -> pb.StageControlResponse:
        claim = self.claims.holder
        assert claim is not None
        start, end = prepare.layers.start, prepare.layers.end
        layers = local_layer_count(claim.package_ref)
        if not 0 <= start < end or (layers is not None and end > layers):
            within = f" of its {layers} layers" if layers is not None else ""
            return self._reject(pb.REJECT_REASON_BAD_REQUEST,
                                f"layers {start}..{end} are not a range{within} of the package: "
                                "need 0 <= start < end <= layers")
        with self._lock:
            current = self.preparation
            same = (current is not None and current.ref == claim.package_ref
                    and (current.layer_start, current.layer_end) == (start, end)
                    and current.inventory().state is not PrepareState.FAILED)
            if not same:
                sources = [resolve_advertised(source, f"{caller_host}:0")
                           for source in prepare.file_sources if source.lstrip(":")]
                self.preparation = Preparation(
                    claim.package_ref, start, end, stage0=prepare.include_stage0_files,
                    cache_dir=self.cache_dir, manifest_sha256=claim.manifest_sha256 or None,
                    file_sources=sources, token=self.token, index=self.files).start()
        log.info("stage=%s event=prepare layers=%d..%d", self.endpoint, start, end)
        return pb.StageControlResponse(prepare_accepted=pb.PrepareAccepted())

    def inventory(self) -> pb.Inventory:
        if self.preparation is None:
            return pb.Inventory(state=pb.INVENTORY_STATE_FAILED, error="nothing prepared: send Prepare")
        report = self.preparation.inventory()
        return pb.Inventory(
            state=_INVENTORY_STATES[report.state], bytes_present=report.bytes_present,
            bytes_total=report.bytes_total, layers_ready=report.layers_ready, error=report.error,
            layers=pb.LayerRange(start=self.preparation.layer_start, end=self.preparation.layer_end),
            sources=[pb.SourceBytes(source=name, bytes=n, files=files)
                     for name, (n, files) in report.sources.items()],
            bytes_hashed=report.bytes_hashed,
            files=[pb.PreparedFile(path=path, source=source) for path, source in report.files.items()])

    def _load(self, load: pb.StageLoadRequest) -> pb.StageControlResponse:
        prep = self.preparation
        start, end = load.layers.start, load.layers.end
        if prep is None or (prep.layer_start, prep.layer_end) != (start, end) or \
                prep.inventory().state is not PrepareState.READY or prep.package is None:
            return self._reject(pb.REJECT_REASON_NOT_PREPARED,
                                f"layers {start}..{end} are not prepared here; send Prepare and wait "
                                "for Inventory READY first")
        if load.wire_dtype == 0:
            return self._reject(pb.REJECT_REASON_BAD_REQUEST,
                                "Load needs wire_dtype (WIRE_DTYPE_F32, _F16 or _BF16)")
        options = LoadOptions(
            start=start, end=end, stage_index=load.stage_index, stage_count=load.stage_count,
            downstream=load.downstream_peer, wire_dtype=load.wire_dtype,
            context_length=load.kv_cache.context_length,
            max_sessions=load.kv_cache.max_sessions or DEFAULT_MAX_SESSIONS,
            max_batch_tokens=load.batch.max_batch_tokens or DEFAULT_MAX_FRAME_ROWS,
            weight_format=load.weight_format or "auto",
            frame_timeout_s=load.frame_timeout_ms / 1000 or DEFAULT_FRAME_TIMEOUT_S)
        self.unload()
        self._loading = True
        try:
            model = self.loader(prep.package, options)
        except LayerlineError as exc:
            self._failure = str(exc)
            log.error("stage=%s event=load_failed layers=%d..%d error=%s", self.endpoint, start, end, exc)
            return self._reject(pb.REJECT_REASON_LOAD_FAILED, str(exc))
        except Exception as exc:  # a model that cannot load must not take the stage down
            self._failure = f"{type(exc).__name__}: {exc}"
            log.exception("stage=%s event=load_failed layers=%d..%d", self.endpoint, start, end)
            return self._reject(pb.REJECT_REASON_LOAD_FAILED, self._failure)
        finally:
            self._loading = False
        self._failure = ""
        # Each hop's budget covers every stage after it, so the stage nearest a stalled one
        # times out first and the error names the right stage.
        later_stages = max(1, options.stage_count - 1 - options.stage_index)
        downstream = ActivationAddress(options.downstream, self.token) if options.downstream else None
        self.loaded = LoadedStage(model, options, FrameLimits(model.hidden_size, options.max_batch_tokens),
                                  FrameBudget(options.frame_timeout_s * later_stages), downstream)
        holder = self.claims.holder
        self._loaded_run = holder.run_id if holder else None
        log.info("stage=%s event=ready layers=%d..%d index=%d downstream=%s", self.endpoint, start, end,
                 options.stage_index, options.downstream or "-")
        return pb.StageControlResponse(ready=pb.Ready(
            activation_endpoint=self.activation_endpoint, layers=pb.LayerRange(start=start, end=end),
            memory_bytes_used=model.memory_bytes()))

    def serving(self) -> LoadedStage | None:
        """The loaded model while its run's claim is live.

        A lapsed lease frees the model once its sessions are over: sessions in use keep
        being served (their coordinator is alive: it sends them frames) until they end or
        another coordinator claims the stage.
        """
        loaded = self.loaded
        if loaded is not None and self.claims.holder is None:
            if loaded.model.session_count():
                if not self._lapse_logged:
                    log.warning("stage=%s event=lease_lapsed action=keep sessions=%d", self.endpoint,
                                loaded.model.session_count())
                    self._lapse_logged = True
                return loaded
            log.warning("stage=%s event=lease_lapsed action=unload", self.endpoint)
            self.unload()
        return self.loaded

    def _cancel_preparation(self) -> None:
        """Stop the preparation under way (its run is over): it writes no more bytes."""
        with self._lock:
            if self.preparation is not None:
                self.preparation.cancel()
                self.preparation = None

    def unload(self) -> None:
        """Drop the loaded model (if any); its sessions go with it."""
        self.loaded = None
        self._loaded_run = None
        self._lapse_logged = False

    # ------------------------------------------------------------ status

    def state(self) -> int:
        self.serving()
        if self._loading:
            return pb.STAGE_STATE_LOADING
        if self.loaded is not None:
            return pb.STAGE_STATE_READY
        if self._failure:
            return pb.STAGE_STATE_FAILED
        if self.claims.holder is None:
            return pb.STAGE_STATE_FREE
        if self.preparation is None:
            return pb.STAGE_STATE_CLAIMED
        state = self.preparation.inventory().state
        return {PrepareState.PREPARING: pb.STAGE_STATE_PREPARING,
                PrepareState.READY: pb.STAGE_STATE_PREPARED,
                PrepareState.FAILED: pb.STAGE_STATE_FAILED}[state]

    def status(self) -> pb.Status:
        holder = self.claims.holder
        total, free = host_memory()
        loaded = self.loaded
        return pb.Status(
            state=self.state(), healthy=True, message=self._failure,
            holder_coordinator_id=holder.coordinator_id if holder else "",
            holder_term=holder.term if holder else 0, run_id=holder.run_id if holder else "",
            lease_remaining_ms=max(0, int((holder.expires_at - self._clock()) * 1000)) if holder else 0,
            loaded_layers=pb.LayerRange(start=loaded.options.start, end=loaded.options.end)
            if loaded else None,
            memory_total_bytes=total, memory_free_bytes=free,
            activation_endpoint=self.activation_endpoint, version=__version__,
            active_sessions=loaded.model.session_count() if loaded else 0,
            kv_cache_bytes=loaded.model.kv_cache_bytes() if loaded else 0)
