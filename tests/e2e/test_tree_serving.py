"""Token trees served: stage 0 drafts a tree per step (a draft model's, n-gram branches) and
verifies it over 1, 2 or 3 real stage processes (tiny llama; qwen2, gemma3's sliding window and
qwen3_moe's experts at 2); greedy text over the official `openai` client is token for token the
text without speculation, for concurrent requests whose trees share passes too, and
`usage.speculative.tree` says what the trees did."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import numpy as np
import pytest

from layerline.packager.build import BuildOptions, build_package

from helpers import Stage0Process, start_stage0, wait_for_draft
from tiny_architectures import (
    CONFIGS,
    random_weights,
    small_tokenizer,
    small_tokenizer_dir,
    write_safetensors_model,
)

ADMIN_TOKEN = "tree-serving-test-secret"
PROMPTS = ["Once upon a time", "def fibonacci(n):", "The capital of France is"]
MAX_TOKENS = 24


def tiny_pair(root: Path, arch: str, tokenizer_dir: Path) -> tuple[Path, Path]:
    """f32 packages of a tiny random `arch` model and of its draft: the same weights, perturbed."""
    config = CONFIGS[arch]
    weights = random_weights(config)
    rng = np.random.default_rng(7)
    near = {k: (v * (1 + 0.05 * rng.standard_normal(v.shape))).astype(v.dtype) for k, v in weights.items()}
    packages = []
    for name, w in (("target", weights), ("draft", near)):
        folder = write_safetensors_model(root / f"{arch}-{name}-hf", config, w, tokenizer_dir)
        out = root / f"{arch}-{name}"
        build_package(str(folder), out, BuildOptions(quantize="f32", quiet=True))
        packages.append(out)
    return packages[0], packages[1]


@pytest.fixture(scope="module")
def tree_tokenizer_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tokenizer_dir(tmp_path_factory.mktemp("tree-tokenizer") / "tokenizer",
                               small_tokenizer(smollm2_gguf))


# (architecture, stage processes): one fast case; the stage counts on llama, the others at 2.
SLOW_PIPELINES = [("llama", 1), ("llama", 3), ("qwen2", 2), ("gemma3_text", 2), ("qwen3_moe", 2)]
PIPELINES = [("llama", 2)] + [pytest.param(case, marks=pytest.mark.slow) for case in SLOW_PIPELINES]


@pytest.fixture(scope="module", params=PIPELINES, ids=lambda case: f"{case[0]}-{case[1]}-stages")
def tree_pipeline(request, tree_tokenizer_dir, tmp_path_factory):
    """Stage 0 and its peer processes: the tiny model's draft, fixed windows, trees by --tree."""
    arch, stage_count = request.param
    root = tmp_path_factory.mktemp(f"tree-serving-{arch}-{stage_count}")
    target, draft = tiny_pair(root, arch, tree_tokenizer_dir)
    (root / "admin-token").write_text(ADMIN_TOKEN + "\n")
    config = (f'[defaults.speculative]\ndraft_model = "{draft}"\nwindow_policy = "fixed"\n'
              f'initial_window = 4\ntree = "auto"\noverlap = true\n[admin]\ndraft_roots = ["{root}"]\n')
    stage0, stages = start_stage0(target, stage_count - 1, root / "cache", config, "--tree", "4,3",
                                  "--admin-token-file", str(root / "admin-token"))
    wait_for_draft(stage0, "ready")
    assert len(stage0.status()["stages"]) == stage_count  # stage 0's own layers, then each peer's
    yield stage0
    stage0.stop()
    for stage in stages:
        stage.stop()


def complete(stage0: Stage0Process, prompt: str, speculative: dict | None = None) -> dict:
    """A greedy completion over the openai client, as a plain dict (usage.speculative included)."""
    client = stage0.client
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"speculative": speculative} if speculative else None)
    return reply.model_dump()


def set_ngram(stage0: Stage0Process) -> None:
    reply = httpx.put(f"{stage0.url}/v1/draft", json={"draft_model": "ngram"},
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["type"] == "ngram" and reply.json()["tree"] == "4,3"


def test_greedy_text_with_token_trees_is_the_text_without_speculation(tree_pipeline):
    speculative = tree_pipeline.status()["speculative"]
    assert speculative["tree"] == "4,3" and speculative["sources"]["tree"] == "flag --tree"
    assert speculative["tree_state"]["active"] and speculative["tree_state"]["chains_because"] is None
    assert speculative["tree_state"]["overlap"] == "off for requests that draft trees"
    plains = {}
    for prompt in PROMPTS:
        plain = complete(tree_pipeline, prompt, {"enabled": False})
        plains[prompt] = plain["choices"][0]["text"]
        assert "tree" not in plain["usage"]["speculative"]  # a request without trees: as before
        treed = complete(tree_pipeline, prompt)
        usage = treed["usage"]["speculative"]
        assert treed["choices"][0]["text"] == plains[prompt], prompt
        assert treed["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
        tree = usage["tree"]
        assert usage["overlap"] is False and tree["policy"] == "fixed" and tree["steps"] > 0, usage
        assert tree["nodes"] == usage["drafted"] and tree["nodes_per_step"] > 4  # wider than a chain
        assert len(tree["accept_rate_by_depth"]) <= 4 and tree["depths_drafted"][0] == tree["steps"]
        assert sum(count * path for path, count in tree["paths"]) == usage["accepted"]
    profile = tree_pipeline.status()["profile"]
    assert profile["trees"]["passes"] > 0 and profile["trees"]["nodes_per_pass"] > 4

    set_ngram(tree_pipeline)  # n-gram branches: every earlier match of the context's end
    for prompt in PROMPTS:
        treed = complete(tree_pipeline, prompt)
        assert treed["choices"][0]["text"] == plains[prompt], prompt
        assert treed["usage"]["speculative"]["strategy"] == "ngram"


def test_concurrent_tree_requests_share_passes_and_keep_their_own_text(tree_pipeline):
    prompts = PROMPTS * 2
    alone = [complete(tree_pipeline, p, {"enabled": False})["choices"][0]["text"] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: complete(tree_pipeline, p), prompts))
    assert [r["choices"][0]["text"] for r in replies] == alone
    usages = [r["usage"]["speculative"] for r in replies]
    assert all(u["tree"]["steps"] > 0 for u in usages if u["drafted"])
    assert max(u["batch"]["mean_sessions"] for u in usages) > 1  # trees rode in shared passes
