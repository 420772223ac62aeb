"""Continuous batching: many requests' passes run together, and every answer stays its own.

In one process, the scheduler over a whole tiny model: sampled tokens of requests that share
batch passes follow the target's distribution. Through real stage processes with the
official `openai` client: concurrent streams mixing greedy, seeded sampling, speculation on
and off, and clients that leave mid-stream; every greedy text equals its answer alone.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from layerline.proto import activation_pb2 as pb
from layerline.runtime.decode.batch_window import batch_window
from layerline.runtime.decode.loop import generate
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.decode.scheduled_drafter import ScheduledDrafter
from layerline.runtime.decode.window_policy import FixedWindow
from layerline.runtime.stage0.target import PipelineTarget

from helpers import Stage0Process, StageProcess, activation_connection, batch_frame
from sampling_checks import (
    SAMPLES,
    SIGNIFICANCE,
    chi_square_p,
    exact_joint,
    one_stage_scheduler,
    tiny_pipeline,
)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("batching-tiny")
    return {"target": tiny_pipeline(root, smollm2_tokenizer_dir, seed=1),
            "near": tiny_pipeline(root, smollm2_tokenizer_dir, seed=1, noise=0.05)}


@pytest.mark.slow
def test_sampled_tokens_follow_the_targets_distribution_under_batching(tiny_models):
    target, draft = tiny_models["target"], tiny_models["near"]
    scheduler, drafts = one_stage_scheduler(target), one_stage_scheduler(draft)
    params = SamplingParams(max_tokens=3, temperature=1.0)
    prompt = [3, 5, 3, 5, 3]
    counts: Counter = Counter()
    lock = threading.Lock()

    def sample(seed: int) -> None:
        seeded = replace(params, seed=seed)
        session, draft_session = scheduler.open(f"s{seed}"), drafts.open(f"d{seed}")
        try:
            # Every other request drafts, its draft steps batched with the others': drafted
            # windows and plain steps share the target's passes.
            drafter = ScheduledDrafter(draft_session, draft.head.vocab_size, seeded) if seed % 2 else None
            generation = generate(PipelineTarget(session), prompt, seeded, drafter=drafter,
                                  policy=FixedWindow(2) if drafter else None, first_token_first=False)
            tokens = [t.id for t in generation]
        finally:
            session.close()
            draft_session.close()
        with lock:
            counts[tuple(tokens)] += 1

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(sample, range(SAMPLES)))
    scheduler.close()
    drafts.close()
    joint = exact_joint(target, prompt, params)
    assert not [cell for cell in counts if joint[cell] == 0]
    p_value, df = chi_square_p(counts, joint, SAMPLES)
    assert p_value > SIGNIFICANCE, f"chi-square p={p_value:.2g} (df={df}) under batching"
    for batches in (scheduler.to_json(), drafts.to_json()):
        assert batches["max_seen"] >= 4 and batches["mean_batch"] > 1.5, batches


def test_a_long_prompt_is_prefilled_in_chunks_between_running_steps(tiny_models):
    target = tiny_models["target"]
    scheduler = one_stage_scheduler(target)
    scheduler.max_rows = 64  # a prompt of 300 positions takes several passes
    params = SamplingParams(max_tokens=40)
    short = generate(PipelineTarget(scheduler.open("short")), [1, 2, 3], params)
    stream = iter(short)
    alone = one_stage_scheduler(target)
    reference = [t.id for t in generate(PipelineTarget(alone.open("r")), [1, 2, 3], params)]
    alone.close()
    got = [next(stream).id]  # the short request decodes...
    long_session = scheduler.open("long")
    done = threading.Event()

    def long_prompt() -> None:
        prompt = [4 + i % 20 for i in range(300)]
        list(generate(PipelineTarget(long_session), prompt, SamplingParams(max_tokens=2)))
        done.set()

    thread = threading.Thread(target=long_prompt)
    thread.start()
    for token in stream:  # ...and keeps decoding while the long prompt goes through in pieces
        got.append(token.id)
    thread.join(timeout=60)
    assert done.is_set() and got == reference
    sizes = scheduler.to_json()["batch_sizes"]
    assert int(sizes.get("2", 0)) >= 2, sizes  # passes that carried a prompt piece and a step
    scheduler.close()


def test_speculation_yields_as_the_batch_grows():
    # A pass costs 10 ms plus 1 ms a row: alone, drafting 4 at a 0.8 accept rate pays...
    samples = [(n, 0.010 + 0.001 * n) for n in (1, 5, 8, 16, 32)]
    assert batch_window(4, 0.8, 1, samples, 0.002) == 4
    # ...shared by two, a shorter window pays more; by 16, or at a poor accept rate, none does.
    assert 0 < batch_window(4, 0.8, 2, samples, 0.002) < 4
    assert batch_window(4, 0.8, 16, samples, 0.002) == 0
    assert batch_window(4, 0.2, 2, samples, 0.002) == 0
    # With rows that cost nothing next to the pass (a GPU), drafting keeps paying.
    flat = [(n, 0.010) for n in (1, 8, 32)]
    assert batch_window(4, 0.8, 16, flat, 0.0) == 4


# ---------------------------------------------------------------- through real stage processes

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, a small dog",
           "The three primary colours are", "import numpy as np\n\n", "My favourite fruit is"]


@pytest.fixture(scope="module")
def batched_pipeline(smollm2_package, smollm2_exact_package, tmp_path_factory):
    """SmolLM2 over stage 0 and one peer process, its exact (Q4_1) package as the draft."""
    cache = tmp_path_factory.mktemp("batched")
    stage = StageProcess((), cache)
    config = cache / "config.toml"
    config.write_text(f'[defaults.speculative]\ndraft_model = "{smollm2_exact_package}"\n'
                      'window_policy = "fixed"\ninitial_window = 3\n')
    try:
        stage0 = Stage0Process(smollm2_package, [stage.endpoint], cache, "--config", str(config),
                               "--max-queue", "64")
    except BaseException:
        stage.stop()
        raise
    deadline = time.monotonic() + 120
    while stage0.status()["speculative"]["draft"]["state"] != "ready":
        assert time.monotonic() < deadline, "the draft never loaded"
        time.sleep(0.2)
    yield stage0, stage
    stage0.stop()
    stage.stop()


def test_a_stage_runs_a_batch_as_its_sessions_alone_and_checks_every_session_first(batched_pipeline):
    _, stage = batched_pipeline
    hidden = 576
    rng = np.random.default_rng(0)
    a, b, more = (rng.standard_normal((1, n, hidden)).astype(np.float32) for n in (3, 2, 1))
    connection = activation_connection(stage.endpoint)
    try:
        answer = connection.call(batch_frame(1, [("a", 0, a), ("b", 0, b)]))
        assert answer.WhichOneof("body") == "batch"
        assert [(r.session_id, r.start_pos, r.token_count) for r in answer.batch.sessions] == [("a", 0, 3),
                                                                                                ("b", 0, 2)]
        alone = connection.call(batch_frame(2, [("alone", 0, a)]))
        batched = np.frombuffer(answer.batch.activations.data, dtype=np.float32).reshape(5, hidden)
        by_itself = np.frombuffer(alone.batch.activations.data, np.float32).reshape(3, hidden)
        np.testing.assert_allclose(batched[:3], by_itself, rtol=1e-3, atol=1e-3)
        # b would skip a position: nothing runs, a's cache stays at 3 positions.
        refused = connection.call(batch_frame(3, [("a", 3, more), ("b", 5, more)]))
        assert refused.error.code == pb.ACTIVATION_ERROR_CODE_POSITION_GAP
        assert "session b" in refused.error.message
        gap = connection.call(batch_frame(4, [("a", 4, more)]))
        assert gap.error.code == pb.ACTIVATION_ERROR_CODE_POSITION_GAP
        twice = connection.call(batch_frame(5, [("a", 3, more), ("a", 3, more)]))
        assert twice.error.code == pb.ACTIVATION_ERROR_CODE_BAD_FRAME and "twice" in twice.error.message
        assert connection.call(batch_frame(6, [("a", 3, more), ("b", 2, more)])).WhichOneof("body") == "batch"
    finally:
        connection.close()


@pytest.mark.slow
def test_concurrent_streams_mixing_everything_get_their_solo_answers(batched_pipeline):
    stage0, _ = batched_pipeline
    client = stage0.client

    def stream(prompt: str, *, leave_after: int | None = None, speculate: bool = True,
               **sampling) -> tuple[str, dict | None]:
        extra = {} if speculate else {"speculative": {"enabled": False}}
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stream=True,
                                           stream_options={"include_usage": True}, extra_body=extra,
                                           **({"temperature": 0} | sampling))
        text, usage = "", None
        for i, chunk in enumerate(chunks):
            if leave_after is not None and i >= leave_after:
                chunks.close()  # the client leaves mid-stream
                return text, None
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.model_dump()["usage"]
        return text, usage

    solo = {prompt: stream(prompt, speculate=False)[0] for prompt in PROMPTS}
    jobs = [(p, {}) for p in PROMPTS]  # greedy, speculating
    jobs += [(p, {"speculate": False}) for p in PROMPTS[:4]]  # greedy, plain
    jobs += [(p, {"temperature": 0.8, "seed": i}) for i, p in enumerate(PROMPTS[:3])]  # sampled
    jobs += [(p, {"leave_after": 2}) for p in PROMPTS[:3]]  # clients that leave
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: stream(job[0], **job[1]), jobs))
    for (prompt, kind), (text, usage) in zip(jobs, results, strict=True):
        if "leave_after" in kind:
            continue
        assert usage is not None and text, (prompt, kind)
        if "temperature" not in kind:
            assert text == solo[prompt], (prompt, kind)
        speculative = usage["speculative"]
        assert speculative["batch"]["passes"] > 0
        if kind.get("speculate") is False:
            assert speculative["enabled"] is False and speculative["drafted"] == 0
    batching = stage0.status()["batching"]
    assert batching["max_seen"] >= 4 and batching["mean_batch"] > 1, batching
    # The clients that left, and everyone else, hold no session anywhere once done.
    deadline = time.monotonic() + 10
    while any(s["sessions"] for s in stage0.status()["stages"]):
        assert time.monotonic() < deadline, stage0.status()["stages"]
        time.sleep(0.1)
    assert stage0.metric("layerline_batch_sessions_count") == batching["passes"]
