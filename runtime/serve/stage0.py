"""`layerline stage serve --package …`: stage 0 brings up the pipeline and serves HTTP."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from layerline.errors import LayerlineError
from layerline.packager.package import LayerPackage

from ..model.head import Head
from ..model.kv_cache import SessionStore
from ..model.layer_range import LayerRange
from ..model.tokenizer import end_of_generation_ids, load_tokenizer
from ..model.weights_policy import detect_device, plan_weights
from ..stage.coordinator import Coordinator, CoordinatorOptions
from ..stage.model import StageModel
from ..stage.pipeline import Pipeline
from ..stage.prepare import Preparation, PrepareState, fetch_manifest
from ..stage.server import auth_metadata, read_token
from ..stage.split_plan import parse_split
from ..stage.wire import wire_dtype
from .admin_auth import AdminAuth
from .config import LayerlineConfig
from .dashboard import dashboard_router
from .draft_api import draft_router
from .engine import PipelineEngine
from .frontend import create_app
from .speculation import Stage0Speculation
from .speculative_settings import ResolvedSpeculativeConfig, resolve_speculative

log = logging.getLogger("layerline.stage0")

DEFAULT_CONTEXT = 4096
MAX_BATCH_TOKENS = 512


@dataclass(frozen=True)
class Stage0Options:
    package: str
    peers: list[str] = field(default_factory=list)
    split: str = "auto"
    http: str = "127.0.0.1:8000"
    config: LayerlineConfig = field(default_factory=LayerlineConfig)
    no_draft: bool = False
    wire_dtype: str = "f32"
    weights: str = "auto"
    context_length: int | None = None
    max_sessions: int = 16
    cache_dir: Path = Path("~/.cache/layerline/stage")
    auth_token_file: Path | None = None
    admin_token_file: Path | None = None  # guards /v1/draft and the dashboard


def _open_package(ref: str, cache_dir: Path) -> LayerPackage:
    """The package stage 0 plans from: the local folder, or the manifest fetched from the Hub."""
    return LayerPackage.open(fetch_manifest(ref, cache_dir))


def _materialize_stage0(ref: str, start: int, end: int, cache_dir: Path) -> LayerPackage:
    """Fetch and verify stage 0's own layers plus embedding, head and tokenizer."""
    prep = Preparation(ref, start, end, stage0=True, cache_dir=cache_dir).start()
    report = prep.wait()
    if report.state is not PrepareState.READY or prep.package is None:
        raise LayerlineError(f"stage 0 could not prepare layers {start}..{end}: {report.error}")
    return prep.package


class Stage0:
    """Everything stage 0 runs, wired together; `serve()` blocks until shutdown."""

    def __init__(self, options: Stage0Options) -> None:
        self.options = options
        self.cache_dir = options.cache_dir.expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.token = read_token(options.auth_token_file)
        self.admin = AdminAuth(read_token(options.admin_token_file, "--admin-token-file"))
        self.package = _open_package(options.package, self.cache_dir)
        manifest = self.package.manifest
        self.speculative: ResolvedSpeculativeConfig = resolve_speculative(
            manifest.model.id, manifest.speculative_decoding, options.config, no_draft=options.no_draft)
        log.info("event=speculation enabled=%s reason=%s settings=%s", self.speculative.enabled,
                 self.speculative.reason, self.speculative.to_json())
        model_context = int(manifest.config.get("max_position_embeddings") or DEFAULT_CONTEXT)
        self.context_length = options.context_length or min(model_context, DEFAULT_CONTEXT)
        split = None if options.split == "auto" else parse_split(options.split, manifest.num_layers)
        self.coordinator = Coordinator(self.package, CoordinatorOptions(
            package_ref=options.package, peers=list(options.peers), split=split,
            wire_dtype=wire_dtype(options.wire_dtype), token=self.token,
            context_length=self.context_length, max_sessions=options.max_sessions,
            max_batch_tokens=MAX_BATCH_TOKENS, weight_format=options.weights))
        self.speculation = Stage0Speculation(
            self.speculative, target_fingerprint=manifest.tokenizer.fingerprint,
            cache_dir=self.cache_dir, weights=options.weights)
        self.started = time.time()
        self.engine: Any = None

    def bring_up(self) -> None:
        """Load every peer, then stage 0's own range, embedding, head and tokenizer.

        The draft loads in the background meanwhile; requests speculate once it is ready.
        """
        self.speculation.start()
        self.coordinator.bring_up()
        try:
            self._load_local()
        except BaseException:
            self.coordinator.shutdown()  # every claimed peer is released when stage 0 cannot start
            raise

    def _load_local(self) -> None:
        start, end = self.coordinator.stage0_range
        package = _materialize_stage0(self.options.package, start, end, self.cache_dir)
        manifest = package.manifest
        files = manifest.layer_files(start, end)
        plan = plan_weights(self.options.weights, manifest, files, detect_device())
        layers = LayerRange.load(package, start, end, plan)
        local = StageModel(layers, SessionStore(layers.make_cache, max_sessions=self.options.max_sessions),
                           self.context_length, getattr(mx, plan.compute_dtype))
        head = Head.load(package, plan)
        tokenizer = load_tokenizer(package)
        pipeline = Pipeline(head, local, first_peer=self.coordinator.first_endpoint(),
                            wire_dtype=wire_dtype(self.options.wire_dtype),
                            hidden_size=int(manifest.config["hidden_size"]), max_tokens=MAX_BATCH_TOKENS,
                            metadata=auth_metadata(self.token),
                            on_stage_error=self.coordinator.mark_down)
        self.engine = PipelineEngine(
            manifest, tokenizer, pipeline, context_length=self.context_length,
            end_ids=end_of_generation_ids(tokenizer, package), max_batch_tokens=MAX_BATCH_TOKENS,
            speculation=self.speculation, status=self.status, ready=lambda: self.coordinator.ready)
        self.coordinator.start_watching()
        log.info("event=ready model=%s stage0_layers=%d..%d peers=%d %s", manifest.model.id, start, end,
                 len(self.options.peers), plan.describe())

    def status(self) -> dict[str, Any]:
        manifest = self.package.manifest
        start, end = self.coordinator.stage0_range
        stage0 = {"stage": 0, "endpoint": "local", "layers": [start, end],
                  "state": "ready" if self.engine is not None else "loading"}
        return {
            "model": manifest.model.id,
            "package": self.options.package,
            "layers": manifest.num_layers,
            "run_id": self.coordinator.run_id,
            "coordinator_id": self.coordinator.coordinator_id,
            "term": self.coordinator.term,
            "ready": self.coordinator.ready and self.engine is not None,
            "split": [[s["layers"][0], s["layers"][1]] for s in [stage0, *self.coordinator.status()]],
            "stages": [stage0, *self.coordinator.status()],
            "wire_dtype": self.options.wire_dtype,
            "context_length": self.context_length,
            "speculative": self.speculation.to_json(),
            "uptime_s": round(time.time() - self.started, 1),
        }

    def stage_states(self) -> list[tuple[str, str, bool]]:
        return [(str(s["stage"]), s["endpoint"], s["state"] == "ready") for s in self.status()["stages"]]

    def app(self) -> Any:
        """The HTTP app: the OpenAI API, the draft API and the dashboard."""
        app = create_app(self.engine, stage_states=self.stage_states)
        app.include_router(draft_router(self.speculation, self.admin))
        app.include_router(dashboard_router(self.admin))
        return app

    def serve(self) -> None:
        import uvicorn

        host, _, port = self.options.http.rpartition(":")
        app = self.app()
        print(f"stage 0 serving {self.package.manifest.model.id} on http://{host}:{port} "
              f"(dashboard at /, admin token {'required' if self.admin.required else 'off'})", flush=True)
        try:
            uvicorn.run(app, host=host, port=int(port), log_level="warning")
        finally:
            self.coordinator.shutdown()


def run_stage0(options: Stage0Options) -> None:
    """Bring up the pipeline and serve until interrupted; on failure, every stage is released."""
    stage0 = Stage0(options)
    stage0.bring_up()
    stage0.serve()
