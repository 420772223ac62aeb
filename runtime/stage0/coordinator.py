"""Stage 0 as coordinator: plan the split, bring every peer to Ready, watch and repair them.

Sequence per peer: Claim (with a layer probe) → Prepare(range) → Inventory (poll) → Load →
Ready. The split is planned once every peer is claimed, from the times and free memory they
reported and stage 0's own (`placement.py`), unless `--split` gives it. If any
stage fails, every stage claimed for the run is released and the error names the
stage, its range and the cause. From the claims on, each stage's lease is renewed on a
thread and channel of its own (`lease_keeper.py`), so that renewals never wait behind a
slower stage, a health check, a load, compute or activation traffic; a heartbeat
(Status) watches each stage's health, and a stage that comes back after dying is
claimed and loaded again. `confirm()` looks at every stage's claim now, for /health,
rather than at the last heartbeat's.

With a pool of spares (`--spare`, or a discovery's), a stage that dies or stops answering is
replaced instead, on a thread of its own: a spare is claimed, prepares and loads the lost
range (its content cache first, then Fetch from stage 0 or the other stages), and the stage
before it is loaded again to relink to it; then `Failover.repaired` lets the lanes replay
their sessions and go on. A spare that fails is released and the next one tried; with none
within `failover_s` the pipeline is degraded (and the search goes on). The lost peer rejoins
the pool, so a peer that comes back is claimed at most once, as a spare.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from layerline.errors import LayerlineError, StageLoadError, StageUnavailableError
from layerline.packager.manifest import MANIFEST_NAME
from layerline.packager.package import LayerPackage, sha256_file
from layerline.proto import activation_pb2 as act_pb
from layerline.proto import stage_control_pb2 as pb

from ..model.host_memory import host_memory
from ..model.layer_shape import LayerShape, LayerTiming
from ..model.session_limit import DEFAULT_MAX_SESSIONS
from ..stage.claims import DEFAULT_LEASE_S
from ..stage.client import StageClient
from ..stage.frame_budget import DEFAULT_FRAME_TIMEOUT_S
from ..stage.probe_messages import shape_message, timing_from_message
from ..stage.server import is_loopback
from ..stage.split_plan import check_split
from ..stage.wire import DEFAULT_MAX_FRAME_ROWS
from .failover import DEFAULT_FAILOVER_S, Failover, Pause
from .lease_keeper import LeaseKeeper
from .placement import Placement, StageReport, given, place
from .spares import SparePool

log = logging.getLogger("layerline.coordinator")

PROBE_CLAIM_TIMEOUT_S = 30.0  # a claim that probes: a slow device may take a few seconds
CONFIRM_TIMEOUT_S = 1.0  # /health's own look at a stage: a stage slower than this is not serving


@dataclass
class PeerState:
    index: int  # 1.. (stage 0 is this process)
    endpoint: str
    start: int
    end: int
    state: str = "planned"  # planned | preparing | loading | ready | down | failed
    bytes_present: int = 0
    bytes_total: int = 0
    error: str = ""
    since: float = field(default_factory=time.time)
    sessions: int = 0  # KV-cache sessions the stage held at the last heartbeat
    kv_cache_bytes: int = 0
    rate: TransferRate = field(default_factory=lambda: TransferRate())
    sources: dict[str, int] = field(default_factory=dict)  # bytes per source of its last preparation
    bytes_hashed: int = 0

    def to_json(self) -> dict:
        return {"stage": self.index, "endpoint": self.endpoint, "layers": [self.start, self.end],
                "state": self.state, "bytes_present": self.bytes_present,
                "bytes_total": self.bytes_total, "bytes_per_s": round(self.rate.bytes_per_s()),
                "eta_s": self.rate.eta_s(self.bytes_total - self.bytes_present)
                if self.state == "preparing" else None,
                "sources": dict(self.sources), "bytes_hashed": self.bytes_hashed,
                "error": self.error or None, "sessions": self.sessions,
                "kv_cache_bytes": self.kv_cache_bytes}

    def record(self, inventory: pb.Inventory) -> None:
        self.bytes_present, self.bytes_total = inventory.bytes_present, inventory.bytes_total
        self.sources = {s.source: s.bytes for s in inventory.sources}
        self.bytes_hashed = inventory.bytes_hashed
        self.rate.add(inventory.bytes_present)


class TransferRate:
    """Bytes per second over the last few seconds of samples, and the time left at that rate."""

    WINDOW_S = 5.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: list[tuple[float, int]] = []

    def add(self, present: int) -> None:
        now = self._clock()
        if self._samples and present < self._samples[-1][1]:
            self._samples.clear()  # a new preparation (or a file fetched again) starts the count anew
        self._samples.append((now, present))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW_S:
            self._samples.pop(0)

    def bytes_per_s(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_s(self, remaining: int) -> float | None:
        rate = self.bytes_per_s()
        return round(remaining / rate, 1) if rate > 0 else None


@dataclass(frozen=True)
class CoordinatorOptions:
    package_ref: str
    peers: list[str]
    split: list[tuple[int, int]] | None = None  # None: plan from free memory
    wire_dtype: int = act_pb.WIRE_DTYPE_F32
    token: str | None = None
    term: int = 0  # 0: now in unix ms, so a restarted coordinator pre-empts its old self
    lease_s: float = DEFAULT_LEASE_S  # renewed every quarter lease: a long pass never outlasts it
    heartbeat_s: float = 2.0
    prepare_timeout_s: float = 1800.0
    load_timeout_s: float = 600.0
    context_length: int = 4096
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_batch_tokens: int = DEFAULT_MAX_FRAME_ROWS  # rows a peer takes per frame; stage 0 sends PREFILL_STEP
    weight_format: str = "auto"
    frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S  # each stage's budget for the next, beyond compute
    file_source: str = ""  # where stage 0 serves the package's files ("" when it does not)
    failover_s: float = DEFAULT_FAILOVER_S  # how long a lost stage may take to be replaced


def layer_shape(package: LayerPackage, weight_format: str) -> LayerShape | None:
    """The shape every stage is asked to probe; None when the config does not say it."""
    try:
        return LayerShape.of(package.manifest, weight_format)
    except LayerlineError as exc:
        log.warning("event=no_probe reason=%s", exc.message)
        return None


class Coordinator:
    def __init__(self, package: LayerPackage, options: CoordinatorOptions,
                 on_change: Callable[[], None] | None = None, spares: SparePool | None = None,
                 prober: Callable[[LayerShape], LayerTiming] | None = None) -> None:
        self.package = package
        self.options = options
        self.coordinator_id = f"coord-{uuid.uuid4().hex[:12]}"
        self.term = options.term or int(time.time() * 1000)
        self.run_id = f"run-{uuid.uuid4().hex[:12]}"
        self.manifest_sha256 = sha256_file(package.root / MANIFEST_NAME)
        self.clients = [self._client(endpoint) for endpoint in options.peers]
        self.heartbeat_clients = [self._client(endpoint) for endpoint in options.peers]
        self.leases = LeaseKeeper(options.lease_s, self._client)
        self.stage0_range: tuple[int, int] = (0, package.manifest.num_layers)
        self.prober = prober  # times stage 0's own layers; None: stage 0 is not measured
        self.shape = layer_shape(package, options.weight_format)  # None: no probe, planned by memory
        self.placement: Placement | None = None  # the split and why, once planned
        self.peers: list[PeerState] = []
        self._on_change = on_change or (lambda: None)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.spares = spares  # None: no failover, a lost stage is reloaded when it comes back
        self.failover = Failover(options.failover_s)
        self._failing_over: set[int] = set()  # stages being replaced
        self._brought_up = False  # failover starts once every stage was ready (bring_up fails before)
        self._failover_lock = threading.Lock()
        self._confirming = threading.Lock()
        self._confirmed_at = 0.0  # when the last confirm() began (monotonic)

    def _client(self, endpoint: str) -> StageClient:
        return StageClient(endpoint, coordinator_id=self.coordinator_id, term=self.term,
                           run_id=self.run_id, token=self.options.token)

    # ------------------------------------------------------------ planning

    def plan(self, reports: list[StageReport]) -> Placement:
        """The layer ranges of stage 0 and every peer, in order, and why: `--split`'s, else
        planned from what each stage (reports[0]: stage 0) reported."""
        if self.options.split is not None:
            return given(self.check_split(), reports)
        return place(self.package.manifest, self.shape, reports, context_length=self.options.context_length,
                     max_sessions=self.options.max_sessions)

    def check_split(self) -> list[tuple[int, int]]:
        """`--split`'s ranges, once checked against the model and the stages."""
        assert self.options.split is not None
        ranges = list(self.options.split)
        check_split(ranges, self.package.manifest.num_layers)
        if len(ranges) != len(self.clients) + 1:
            raise LayerlineError(
                f"split has {len(ranges)} ranges for {len(self.clients) + 1} stages (stage 0 and "
                f"{len(self.clients)} peers)", hint="give one range per stage, stage 0 first")
        return ranges

    def _claim_and_report(self, client: StageClient, peer: PeerState) -> StageReport:
        """Claim a peer, asking it for a layer probe unless `--split` fixes the plan; what it reported."""
        probing = self.options.split is None and self.shape is not None
        response = self._step(peer, "claim", lambda: client.call(
            timeout_s=PROBE_CLAIM_TIMEOUT_S if probing else None, claim=self._claim_message(probe=probing)))
        accepted = response.claim_accepted
        if accepted.HasField("probe"):
            probe = accepted.probe
            return StageReport(client.endpoint, probe.memory_free_bytes, timing_from_message(probe),
                               probe.error)
        # A stage that does not know the field (or was not asked): its free memory, as before.
        free = self._step(peer, "report its memory", lambda: client.status()).memory_free_bytes
        return StageReport(client.endpoint, free, None, "no probe asked for" if not probing
                           else "the stage reports no probe (an older layerline)")

    def _local_report(self) -> StageReport:
        """Stage 0's own memory and, unless `--split` fixes the plan, its measured layer time."""
        free = host_memory().available
        if self.options.split is not None or self.prober is None or self.shape is None:
            return StageReport("local", free, None, "not measured")
        try:
            timing = self.prober(self.shape)
        except LayerlineError as exc:
            return StageReport("local", free, None, exc.message)
        return StageReport("local", free, timing)

    # ------------------------------------------------------------ bring-up

    def bring_up(self) -> None:
        """Claim, prepare and load every peer; on any failure release them all and raise."""
        if self.options.split is not None:
            self.check_split()  # before any claim
        self.peers = [PeerState(i + 1, client.endpoint, 0, 0) for i, client in enumerate(self.clients)]
        claimed: list[StageClient] = []
        try:
            reports = []
            # One peer at a time, then stage 0: probes on one machine never overlap.
            for client, peer in zip(self.clients, self.peers, strict=True):
                reports.append(self._claim_and_report(client, peer))
                claimed.append(client)
                self.leases.keep(client.endpoint)
            self.placement = self.plan([self._local_report(), *reports])
            ranges = self.placement.ranges
            self.stage0_range = ranges[0]
            for peer, (start, end) in zip(self.peers, ranges[1:], strict=True):
                peer.start, peer.end = start, end
            log.info("event=plan run=%s split=%s source=%s reason=%s", self.run_id,
                     ",".join(f"{s}:{e}" for s, e in ranges), self.placement.source, self.placement.reason)
            self._changed()
            # Leases run from the claim: a stage that loads fast must keep its claim while the
            # slowest one prepares and loads, and while stage 0 loads its own range.
            self._start_watching()
            # Every stage prepares in parallel; loading starts only once all files are verified.
            with ThreadPoolExecutor(max_workers=max(1, len(self.peers))) as pool:
                list(pool.map(self._prepare, self.clients, self.peers))
                list(pool.map(self._load, self.clients, self.peers))
        except LayerlineError as exc:
            self._stop_watching()
            self._release(claimed)
            raise StageLoadError(str(exc), hint="fix the named stage, then start stage 0 again") from exc
        self.failover.first_peer = self.first_endpoint()
        self._brought_up = True
        self._changed()

    def _claim_message(self, probe: bool = False) -> pb.Claim:
        claim = pb.Claim(package=pb.PackageIdentity(ref=self.options.package_ref,
                                                    manifest_sha256=self.manifest_sha256),
                         lease_duration_ms=int(self.options.lease_s * 1000))
        if probe and self.shape is not None:
            claim.probe_shape.CopyFrom(shape_message(self.shape))
        return claim

    def _step(self, peer: PeerState, what: str, call: Callable) -> object:
        try:
            return call()
        except StageUnavailableError as exc:
            peer.state, peer.error = "failed", str(exc)
            self._changed()
            raise StageLoadError(f"stage {peer.index} ({peer.endpoint}, layers {peer.start}..{peer.end}) "
                                 f"failed to {what}: {exc.message}") from exc

    def _prepare_and_load(self, client: StageClient, peer: PeerState) -> None:
        self._prepare(client, peer)
        self._load(client, peer)

    def file_sources(self, peer: PeerState) -> list[str]:
        """Where `peer` may fetch package files it cannot read itself: stage 0, then the other peers
        (whose content caches may hold them from an earlier run)."""
        sources = []
        stage0 = self.options.file_source
        if stage0:
            # A loopback address reaches stage 0 only from its own machine.
            if not is_loopback(stage0.rpartition(":")[0]) or is_loopback(peer.endpoint.rpartition(":")[0]):
                sources.append(stage0)
            else:
                log.warning("event=files_not_offered stage=%d reason=stage 0 serves files on loopback (%s) "
                            "only; give stage 0 --listen 0.0.0.0:PORT to serve them to %s", peer.index,
                            stage0, peer.endpoint)
        return sources + [other.endpoint for other in self.peers if other is not peer]

    def _prepare(self, client: StageClient, peer: PeerState) -> None:
        peer.state = "preparing"
        peer.rate = TransferRate()
        self._changed()
        prepare = pb.Prepare(layers=pb.LayerRange(start=peer.start, end=peer.end),
                             file_sources=self.file_sources(peer))
        self._step(peer, "prepare", lambda: client.call(prepare=prepare))
        deadline = time.monotonic() + self.options.prepare_timeout_s
        while True:
            inventory = self._step(peer, "report inventory",
                                   lambda: client.call(inventory=pb.InventoryRequest())).inventory
            peer.record(inventory)
            self._changed()
            if inventory.state == pb.INVENTORY_STATE_READY:
                log.info("event=stage_prepared stage=%d bytes=%d hashed=%d sources=%s", peer.index,
                         inventory.bytes_total, inventory.bytes_hashed,
                         ",".join(f"{s.source}:{s.bytes}" for s in inventory.sources) or "-")
                break
            if inventory.state == pb.INVENTORY_STATE_FAILED:
                peer.state, peer.error = "failed", inventory.error
                self._changed()
                raise StageLoadError(f"stage {peer.index} ({peer.endpoint}, layers {peer.start}.."
                                     f"{peer.end}) failed to prepare: {inventory.error}")
            if time.monotonic() > deadline:
                raise StageLoadError(f"stage {peer.index} ({peer.endpoint}) still preparing after "
                                     f"{self.options.prepare_timeout_s:.0f} s")
            time.sleep(0.2)

    def _load(self, client: StageClient, peer: PeerState) -> None:
        layers = pb.LayerRange(start=peer.start, end=peer.end)
        peer.state = "loading"
        self._changed()
        downstream = self.peers[peer.index].endpoint if peer.index < len(self.peers) else ""
        load = pb.StageLoadRequest(
            layers=layers, stage_index=peer.index, stage_count=len(self.peers) + 1,
            upstream_peer=self.peers[peer.index - 2].endpoint if peer.index > 1 else "",
            downstream_peer=downstream,
            package=pb.PackageIdentity(ref=self.options.package_ref, manifest_sha256=self.manifest_sha256),
            wire_dtype=self.options.wire_dtype,
            kv_cache=pb.KvCacheConfig(context_length=self.options.context_length,
                                      max_sessions=self.options.max_sessions),
            batch=pb.BatchConfig(max_batch_tokens=self.options.max_batch_tokens),
            weight_format=self.options.weight_format,
            frame_timeout_ms=int(self.options.frame_timeout_s * 1000))
        self._step(peer, "load", lambda: client.call(timeout_s=self.options.load_timeout_s, load=load))
        peer.state, peer.error = "ready", ""
        peer.since = time.time()
        log.info("event=stage_ready stage=%d endpoint=%s layers=%d..%d", peer.index, peer.endpoint,
                 peer.start, peer.end)
        self._changed()

    def _release(self, clients: list[StageClient]) -> None:
        for client in clients:
            try:
                client.call(release=pb.Release())
                log.info("event=released endpoint=%s run=%s", client.endpoint, self.run_id)
            except StageUnavailableError as exc:
                log.warning("event=release_failed endpoint=%s error=%s", client.endpoint, exc.message)

    def _changed(self) -> None:
        self._on_change()

    # ------------------------------------------------------------ watching

    @property
    def ready(self) -> bool:
        return all(p.state == "ready" for p in self.peers)

    def first_endpoint(self) -> str | None:
        return self.peers[0].endpoint if self.peers else None

    def _start_watching(self) -> None:
        """Renew every claimed stage's lease and watch its health, on a thread of its own."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="stage-watch", daemon=True)
            self._watcher.start()

    def _stop_watching(self) -> None:
        self._stop.set()
        self.leases.stop()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.options.heartbeat_s):
            for client, peer in zip(self.heartbeat_clients, self.peers, strict=True):
                if self._stop.is_set():
                    return
                if peer.index not in self._failing_over:  # its failover watches it meanwhile
                    self._check(client, peer)

    def _check(self, client: StageClient, peer: PeerState) -> None:
        try:
            status = client.status(timeout_s=self.options.heartbeat_s * 2)  # unfenced
        except StageUnavailableError as exc:
            if peer.state != "down":
                log.error("event=stage_down stage=%d endpoint=%s error=%s", peer.index, peer.endpoint,
                          exc.message)
                peer.state, peer.error = "down", exc.message
                self._changed()
            self._begin_failover(peer)
            return
        peer.sessions, peer.kv_cache_bytes = status.active_sessions, status.kv_cache_bytes
        if peer.state not in ("ready", "down"):
            return  # still being brought up (or failed to be): bring_up says how it goes
        lost = self._lost(status, peer)
        if lost is None:
            if peer.state == "down":
                peer.state, peer.error = "ready", ""
                self._changed()
            return
        # Alive again but without our claim or model (restarted, pre-empted, or its lease lapsed).
        self.mark_down(peer.index, lost)
        if self.spares is None:
            self._repair(client, peer)

    def _lost(self, status: pb.Status, peer: PeerState) -> str | None:
        """What `peer` lacks to serve this run, by its `status`; None while it holds our claim and range."""
        if (status.holder_coordinator_id, status.holder_term) != (self.coordinator_id, self.term):
            if status.holder_coordinator_id:
                return (f"stage lost its claim: {status.holder_coordinator_id} holds it at term "
                        f"{status.holder_term}")
            return "stage lost its claim: its lease lapsed, or it restarted"
        loaded = (status.loaded_layers.start, status.loaded_layers.end) == (peer.start, peer.end)
        if not loaded or status.state != pb.STAGE_STATE_READY:
            held = status.loaded_layers
            return f"stage lost its model: it holds layers {held.start}..{held.end}"
        return None

    def confirm(self) -> str | None:
        """Why the pipeline cannot serve now, after asking every ready stage for its claim; None if it can.

        The heartbeat sees a lost claim only at its next beat; /health asks now. Callers that
        arrive while a look is under way share the next one, so a burst costs two.
        """
        arrived = time.monotonic()
        with self._confirming:
            if self._confirmed_at < arrived:
                self._confirmed_at = time.monotonic()
                for client, peer in zip(self.heartbeat_clients, self.peers, strict=True):
                    if peer.state != "ready":
                        continue
                    try:
                        lost = self._lost(client.status(timeout_s=CONFIRM_TIMEOUT_S), peer)
                    except StageUnavailableError as exc:
                        lost = exc.message
                    if lost is not None:
                        log.error("event=stage_down stage=%d endpoint=%s error=%s seen_by=health",
                                  peer.index, peer.endpoint, lost)
                        self.mark_down(peer.index, lost)
        return self.unready_reason()

    def unready_reason(self) -> str | None:
        """Why the pipeline cannot serve, by what is known now; None when every stage is ready."""
        for peer in self.peers:
            if peer.state != "ready":
                why = f": {peer.error}" if peer.error else ""
                return (f"stage {peer.index} ({peer.endpoint}, layers {peer.start}..{peer.end}) "
                        f"is {peer.state}{why}")
        return None

    def mark_down(self, index: int, error: str) -> None:
        """Record that stage `index` failed (seen by a request before the heartbeat did)."""
        peer = self.peers[index - 1]
        if peer.state in ("ready", "down"):
            peer.state, peer.error = "down", error or peer.error
            self._changed()
            self._begin_failover(peer)

    def _repair(self, client: StageClient, peer: PeerState) -> None:
        """A stage that answers again but lost its claim or model: claim and load it anew."""
        log.info("event=stage_repair stage=%d endpoint=%s", peer.index, peer.endpoint)
        try:
            client.call(claim=self._claim_message())
            self._prepare_and_load(client, peer)
        except LayerlineError as exc:
            peer.state, peer.error = "down", str(exc)
            self._changed()

    # ------------------------------------------------------------ failover

    def _begin_failover(self, peer: PeerState) -> None:
        """Replace a lost stage on a thread of its own (once at a time per stage), with spares."""
        if self.spares is None or not self._brought_up or self._stop.is_set():
            return
        with self._failover_lock:
            if peer.index in self._failing_over:
                return
            self._failing_over.add(peer.index)
        pause = self.failover.begin(peer.index, (peer.start, peer.end), peer.endpoint)
        log.warning("event=failover_start stage=%d endpoint=%s layers=%d..%d error=%s", peer.index,
                    peer.endpoint, peer.start, peer.end, peer.error or "-")
        threading.Thread(target=self._fail_over, args=(peer, pause), name=f"failover-{peer.index}",
                         daemon=True).start()

    def _fail_over(self, peer: PeerState, pause: Pause) -> None:
        """Until the stage is repaired (or stage 0 stops): the lost peer if it still serves, else
        each spare in turn, then the lost peer again; degraded past the deadline."""
        assert self.spares is not None
        deadline = time.monotonic() + self.options.failover_s
        lost = peer.endpoint
        try:
            if self._still_serving(self.heartbeat_clients[peer.index - 1], peer):
                log.info("event=failover_relink stage=%d endpoint=%s reason=the stage still serves",
                         peer.index, peer.endpoint)
                peer.state, peer.error = "ready", ""
                pause.replacement = peer.endpoint
                self.failover.repaired(pause, self.first_endpoint())
                return
            while not self._stop.is_set():
                busy = {other.endpoint for other in self.peers if other is not peer}
                self.spares.look(exclude=busy | {lost})
                for endpoint in dict.fromkeys([*self.spares.candidates(), lost]):
                    if endpoint in busy or self._stop.is_set():
                        continue
                    try:
                        self._replace(peer, endpoint, pause)
                    except LayerlineError as exc:
                        if pause.tried.get(endpoint) != exc.message:  # once per endpoint and cause
                            log.warning("event=failover_candidate_failed stage=%d endpoint=%s error=%s",
                                        peer.index, endpoint, exc.message)
                        pause.tried[endpoint] = exc.message
                        continue
                    self.spares.withdraw(endpoint)
                    if endpoint != lost:
                        self.spares.offer(lost)  # if it comes back, it rejoins as a spare
                    self.failover.repaired(pause, self.first_endpoint())
                    log.info("event=failover_done stage=%d endpoint=%s claimed_s=%s loaded_s=%s",
                             peer.index, endpoint, pause.claimed_s, pause.loaded_s)
                    return
                if time.monotonic() > deadline and pause.state != "degraded":
                    error = (f"stage {peer.index} (layers {peer.start}..{peer.end}) was lost at {lost} "
                             f"and no spare replaced it within {self.options.failover_s:g} s")
                    if pause.tried:
                        error += f" (tried: {'; '.join(f'{e}: {why}' for e, why in pause.tried.items())})"
                    log.error("event=degraded stage=%d error=%s", peer.index, error)
                    self.failover.degrade(pause, error)
                    self._changed()
                self._stop.wait(self.options.heartbeat_s)
        finally:
            with self._failover_lock:
                self._failing_over.discard(peer.index)

    def _still_serving(self, client: StageClient, peer: PeerState) -> bool:
        """Whether the peer answers, holds our claim and has its range loaded (a false alarm)."""
        try:
            status = client.status(timeout_s=self.options.heartbeat_s * 2)
        except StageUnavailableError:
            return False
        return self._lost(status, peer) is None

    def _replace(self, peer: PeerState, endpoint: str, pause: Pause) -> None:
        """Claim `endpoint` for the lost stage, prepare and load its range there, and load the
        stage before it again to relink it; the peer is left as it was if any step fails."""
        i = peer.index - 1
        lost = (peer.endpoint, self.clients[i], self.heartbeat_clients[i])
        client, heartbeat = self._client(endpoint), self._client(endpoint)
        claimed = False
        try:
            client.call(timeout_s=self.options.heartbeat_s * 2, claim=self._claim_message())
            claimed = True
            self.leases.keep(endpoint)
            pause.claimed_s = pause.since()
            peer.endpoint, self.clients[i], self.heartbeat_clients[i] = endpoint, client, heartbeat
            self._prepare_and_load(client, peer)
            if peer.index > 1:  # the stage before sends to the replacement from now on
                self._load(self.clients[i - 1], self.peers[i - 1])
        except LayerlineError:
            peer.endpoint, self.clients[i], self.heartbeat_clients[i] = lost
            peer.state = "down"
            if claimed:
                self.leases.drop(endpoint)
                self._release([client])
            client.close()
            heartbeat.close()
            self._changed()
            raise
        pause.replacement, pause.loaded_s = endpoint, pause.since()
        if lost[0] != endpoint:
            self.leases.drop(lost[0])
        for old in lost[1:]:
            old.close()
        log.info("event=stage_replaced stage=%d lost=%s replacement=%s", peer.index, lost[0], endpoint)

    def status(self) -> list[dict]:
        return [p.to_json() for p in self.peers]

    def shutdown(self) -> None:
        """Stop watching and release every peer."""
        self._stop_watching()
        self._release(self.clients)
        for client in [*self.clients, *self.heartbeat_clients]:
            client.close()
