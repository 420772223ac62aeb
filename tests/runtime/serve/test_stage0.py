"""Stage 0's object: building it starts nothing; `start()` serves the files and makes the coordinator."""

from __future__ import annotations

import threading

import pytest

from layerline.errors import LayerlineError
from layerline.runtime.decode.targets import PREFILL_STEP
from layerline.runtime.serve.stage0 import Stage0, Stage0Options


def test_stage0_binds_and_spawns_nothing_until_started(tiny_llama_package, tmp_path):
    threads = threading.active_count()
    stage0 = Stage0(Stage0Options(package=str(tiny_llama_package), cache_dir=tmp_path / "cache"))
    assert stage0.file_server is None and stage0.engine is None and stage0.local is None
    assert threading.active_count() == threads
    assert not (tmp_path / "cache").exists()
    with pytest.raises(LayerlineError, match="not started"):
        stage0.serve()

    stage0.start()
    try:
        assert stage0.file_server is not None
        # Peers are told to take frames as large as stage 0's passes: the prefill step.
        assert stage0.coordinator.options.max_batch_tokens == PREFILL_STEP
        assert stage0.status()["stages"][0]["state"] == "loading"
    finally:
        stage0.file_server.stop(grace=None)
