"""llama.cpp's `llama-bench` on a GGUF file: its prompt (pp) and generation (tg) speed, for
`layerline bench decode --llama-bench PATH` to set beside layerline's on the same file and threads.

llama.cpp is never a dependency; build `llama-bench` from the `llama-cpp-python` sdist's
`vendor/llama.cpp` (docs/benchmarks.md says how).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from layerline.errors import LayerlineError

_HINT = ("build llama-bench from llama-cpp-python's vendor/llama.cpp: cmake -B build -DLLAMA_CURL=OFF && "
         "cmake --build build --target llama-bench (docs/benchmarks.md)")


@dataclass(frozen=True)
class LlamaBenchResult:
    model_type: str  # as llama.cpp names it, e.g. "qwen2 1.5B Q4_K - Medium"
    threads: int
    prompt_tokens: int
    tokens: int
    pp_tps: float  # prompt processing, tokens per second
    tg_tps: float  # text generation (decode), tokens per second
    argv: list[str]


def run_llama_bench(binary: Path, gguf: Path, *, threads: int, prompt_tokens: int = 128, tokens: int = 64,
                    repeats: int = 2, timeout_s: float = 3600) -> LlamaBenchResult:
    """Run llama-bench once for a prompt of `prompt_tokens` and a generation of `tokens`."""
    argv = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(tokens),
            "-r", str(repeats), "-o", "json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LayerlineError(f"cannot run {binary}: {exc}", hint=_HINT) from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise LayerlineError(f"llama-bench failed on {gguf.name}: {' / '.join(tail)}", hint=_HINT)
    try:
        tests = json.loads(done.stdout)
        pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
        tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    except (ValueError, KeyError, StopIteration, TypeError) as exc:
        raise LayerlineError(f"llama-bench printed no pp and tg results ({exc})",
                             hint="is it llama.cpp's llama-bench? " + _HINT) from exc
    return LlamaBenchResult(str(tg.get("model_type", "")), int(tg["n_threads"]), prompt_tokens, tokens,
                            float(pp["avg_ts"]), float(tg["avg_ts"]), argv)


def render_llama_bench(result: LlamaBenchResult, layerline_decode_tps: dict[str, float]) -> str:
    """llama.cpp's row, and each layerline format's decode speed as a share of llama.cpp's tg."""
    lines = [f"llama.cpp llama-bench ({result.model_type}, -t {result.threads}): "
             f"pp{result.prompt_tokens} {result.pp_tps:.1f} tok/s, "
             f"tg{result.tokens} {result.tg_tps:.2f} tok/s"]
    for weights, tps in layerline_decode_tps.items():
        lines.append(f"layerline {weights} decode {tps:.2f} tok/s = {tps / result.tg_tps:.2f}× llama.cpp tg")
    return "\n".join(lines)
