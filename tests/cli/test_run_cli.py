"""`layerline run` and `layerline bench decode` as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest


def layerline(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerline", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_run_streams_the_answer_of_a_split_model_and_reports_speeds(smollm2_package):
    result = layerline("run", str(smollm2_package), "--chat", "What is the capital of France?",
                       "--split", "0:12,12:30", "--max-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "blas=" in result.stderr and "weights=" in result.stderr
    assert "range=0..12" in result.stderr and "range=12..30" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("prefill ") and "tok/s, decode " in last


def test_run_refuses_invalid_sampling_values_cleanly(smollm2_package):
    result = layerline("run", str(smollm2_package), "--prompt", "Hi", "--temperature", "-1")
    assert result.returncode == 1
    assert "error: invalid temperature -1.0" in result.stderr and "Traceback" not in result.stderr


def test_run_needs_exactly_one_of_prompt_and_chat(smollm2_package):
    result = layerline("run", str(smollm2_package), "--prompt", "Hi", "--chat", "Hi")
    assert result.returncode == 1 and "exactly one of --prompt and --chat" in result.stderr


def test_run_refuses_a_split_outside_the_model(smollm2_package):
    result = layerline("run", str(smollm2_package), "--prompt", "Hi", "--split", "0:12,12:31")
    assert result.returncode == 1 and "the model has 30" in result.stderr


def test_run_with_a_tree_of_ngram_drafts_answers_as_without(smollm2_package):
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
    args = ("run", str(smollm2_package), "--prompt", code, "--max-tokens", "24")
    plain = layerline(*args)
    tree = layerline(*args, "--draft", "ngram", "--tree", "4,3,8")
    assert plain.returncode == 0 and tree.returncode == 0, tree.stderr
    assert tree.stdout == plain.stdout
    assert "drafts accepted per tree" in " ".join(tree.stderr.split())  # the console may wrap the line


@pytest.mark.slow
def test_run_refuses_a_bad_tree_cleanly(smollm2_package):
    result = layerline("run", str(smollm2_package), "--prompt", "Hi", "--draft", "ngram", "--tree", "4")
    assert result.returncode == 1 and "is not DEPTH,WIDTH[,NODES]" in result.stderr
    result = layerline("run", str(smollm2_package), "--prompt", "Hi", "--tree", "4,2")
    assert result.returncode == 1 and "it needs a draft" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_decode_reports_each_format_beside_bare_mlx_lm(tiny_llama_package):
    result = layerline("bench", "decode", str(tiny_llama_package), "--weights", "f32",
                       "--weights", "bf16", "--prompt-tokens", "16", "--tokens", "8",
                       "--repeats", "1")
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| weights"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "weights", "compute", "layerline prefill tok/s", "layerline decode tok/s",
        "mlx-lm prefill tok/s", "mlx-lm decode tok/s", "decode vs mlx-lm", "resident MiB", "× files"]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| f32", "| bf16"))]
    assert len(rows) == 2, result.stdout
    assert "--weights auto here:" in result.stdout
