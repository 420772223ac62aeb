"""Split serving end to end: real stage processes on loopback, stage 0's OpenAI API,
the official `openai` client, failures, fencing and concurrency."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from layerline.proto import activation_pb2 as pb
from layerline.runtime.stage.client import ActivationAddress
from layerline.runtime.stage.frame_budget import FrameBudget
from layerline.runtime.stage.frame_transport import ConnectionRefusedByStage, FrameConnection

from helpers import Stage0Process, activation_connection, batch_frame, greedy_reference, older_stage0_frame

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is",
           "Once upon a time", "def fibonacci(n):", "The color of the sky is",
           "import numpy as", "My favourite fruit is"]


@pytest.fixture
def pipeline(stage_processes, tmp_path):
    """Start stage 0 over `n` fresh peer processes: `pipeline(package, n, *extra_args)`."""
    started = []

    def start(package: Path, peers: int, *extra: str, peer_args: tuple[str, ...] = ()):
        stages = [stage_processes(*peer_args) for _ in range(peers)]
        stage0 = Stage0Process(package, [s.endpoint for s in stages], tmp_path, *extra)
        started.append(stage0)
        return stage0, stages

    yield start
    for stage0 in started:
        stage0.stop()


@pytest.mark.slow
def test_greedy_output_through_two_and_three_stages_equals_one_process(pipeline, smollm2_package):
    reference = greedy_reference(smollm2_package, "The capital of France is", 24)
    for peers in (1, 2):
        stage0, _ = pipeline(smollm2_package, peers)
        result = stage0.client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                                  prompt="The capital of France is", max_tokens=24,
                                                  temperature=0)
        assert result.choices[0].text == reference
        assert [s["state"] for s in stage0.status()["stages"]] == ["ready"] * (peers + 1)
        assert set(stage0.status()["cpu_kernel"]) == {"available", "isa", "threads", "reason", "gemv_x",
                                                      "integer_isa", "gemv_x_reason", "rows_x", "rows_isa",
                                                      "rows_reason"}
        stage0.stop()


def test_openai_client_chat_streaming_and_not(pipeline, smollm2_package):
    stage0, _ = pipeline(smollm2_package, 2)
    client = stage0.client
    assert [m.id for m in client.models.list().data] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    reply = client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                           messages=QUESTION, temperature=0, max_tokens=30)
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=QUESTION, temperature=0, max_tokens=30,
        stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    short = client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                      prompt="Once upon a time", max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

    metrics = httpx.get(f"{stage0.url}/metrics").text
    assert 'layerline_requests_total{endpoint="/v1/chat/completions",status="ok"} 2.0' in metrics
    assert 'layerline_stage_up{endpoint="local",stage="0"} 1.0' in metrics


@pytest.mark.slow
def test_bad_requests_get_openai_errors_with_status_400(pipeline, smollm2_package):
    stage0, _ = pipeline(smollm2_package, 1)
    client = stage0.client
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cases = [
        dict(messages=QUESTION, temperature=3),
        dict(messages=[], max_tokens=5),
        dict(messages=QUESTION, n=2),
        dict(messages=QUESTION, top_p=0),
        dict(messages=[{"role": "user", "content": "word " * 5000}]),
    ]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=model, **case)
        assert caught.value.status_code == 400
        assert caught.value.body["message"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    raw = httpx.post(f"{stage0.url}/v1/completions", content=b"{not json", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.slow
def test_eight_concurrent_requests_get_their_own_answers(pipeline, smollm2_package):
    stage0, _ = pipeline(smollm2_package, 2)
    client = stage0.client

    def ask(prompt: str) -> str:
        return client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt=prompt,
                                         max_tokens=12, temperature=0).choices[0].text

    alone = [ask(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert together == alone
    assert len(set(alone)) == len(PROMPTS)


@pytest.mark.slow
def test_killed_stage_ends_the_stream_within_5s_and_is_reloaded_after_restart(
        pipeline, smollm2_package, stage_processes):
    stage0, stages = pipeline(smollm2_package, 2)
    client = stage0.client
    stream = client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                       prompt="Once upon a time", max_tokens=2000, temperature=0.8,
                                       stream=True)
    next(iter(stream))
    stages[1].kill()
    killed_at = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert time.monotonic() - killed_at < 5

    deadline = time.monotonic() + 10
    while stage0.status()["stages"][2]["state"] != "down":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert httpx.get(f"{stage0.url}/health").status_code == 503
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
    assert caught.value.status_code == 503

    stage_processes(port=stages[1].port)  # the same stage, restarted
    deadline = time.monotonic() + 60
    while not stage0.status()["ready"]:
        assert time.monotonic() < deadline, stage0.status()
        time.sleep(0.3)
    after = client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                      prompt="The capital of France is", max_tokens=5, temperature=0)
    assert after.choices[0].text.strip()


@pytest.mark.slow
def test_auth_token_on_every_node(pipeline, smollm2_package, tmp_path):
    token = tmp_path / "token"
    token.write_text("let-me-in")
    stage0, stages = pipeline(smollm2_package, 1, "--auth-token-file", str(token),
                              peer_args=("--auth-token-file", str(token)))
    reply = stage0.client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                             prompt="The capital of France is", max_tokens=4,
                                             temperature=0)
    assert reply.choices[0].text
    address = ActivationAddress(stages[0].endpoint, "let-me-in").get()  # Status needs the token too
    for wrong in (None, "let-me-in-not"):
        with pytest.raises(ConnectionRefusedByStage) as caught:
            FrameConnection(address, budget=FrameBudget(10.0), token=wrong)
        assert caught.value.code == pb.ACTIVATION_ERROR_CODE_UNAUTHENTICATED


def frame(session: str, seq: int, array: np.ndarray, start_pos: int = 0,
          dtype: int = pb.WIRE_DTYPE_F32, shape: list[int] | None = None) -> pb.ActivationFrame:
    """One session's rows as stage 0 sends them: a batch of one."""
    return batch_frame(seq, [(session, start_pos, array)], dtype=dtype, shape=shape)


@pytest.mark.slow
def test_malformed_frames_are_refused_and_the_stage_keeps_serving(pipeline, smollm2_package):
    stage0, stages = pipeline(smollm2_package, 1)
    hidden = json.loads((smollm2_package / "model-package.json").read_text())["config"]["hidden_size"]
    good = np.zeros((1, 2, hidden), dtype=np.float32)
    frames = [
        frame("a", 1, good, shape=[1, 2, hidden + 1]),                        # wrong shape
        frame("a", 2, good, dtype=7),                                         # unknown dtype
        frame("a", 3, good, dtype=pb.WIRE_DTYPE_F16),                         # bytes do not fit dtype
        frame("a", 4, np.zeros((1, 5000, hidden), dtype=np.float32)),          # too many positions
        frame("never-seen", 5, good, start_pos=40),                           # unknown session, gap
        pb.ActivationFrame(session_id="a", seq=6),                            # no body
        older_stage0_frame("a", 7, good),                                     # an older stage 0's
        frame("b", 8, good),                                                  # a good one
    ]
    connection = activation_connection(stages[0].endpoint)
    answers = [connection.call(f) for f in frames]
    connection.close()
    assert [a.seq for a in answers] == [1, 2, 3, 4, 5, 6, 7, 8]
    kinds = [a.WhichOneof("body") for a in answers]
    assert kinds == ["error"] * 7 + ["batch"]
    codes = [a.error.code for a in answers[:7]]
    assert codes == [pb.ACTIVATION_ERROR_CODE_BAD_FRAME] * 4 + [
        pb.ACTIVATION_ERROR_CODE_POSITION_GAP] + [pb.ACTIVATION_ERROR_CODE_BAD_FRAME] * 2
    assert "expected [1, 2, 576]" in answers[0].error.message
    assert "stage 0 runs an older layerline; update it" in answers[6].error.message
    assert list(answers[7].batch.activations.shape) == [1, 2, hidden]
    # Stage 0 still serves through that stage.
    reply = stage0.client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                             prompt="Hello", max_tokens=2)
    assert reply.usage.completion_tokens == 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_wire_dtypes_serve_the_same_answer(pipeline, smollm2_package, dtype):
    stage0, _ = pipeline(smollm2_package, 1, "--wire-dtype", dtype)
    reply = stage0.client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                                  messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in reply.choices[0].message.content
    assert stage0.status()["wire_dtype"] == dtype
