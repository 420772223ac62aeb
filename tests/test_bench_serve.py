"""`layerline bench serve`: the matrix, the figures read from a stream, and a quick real run.

The real run is tiny (a 4-layer random llama, one prompt, one run, loopback
stages behind delayed links): it checks that the command runs and reports every
condition and column, never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerline.runtime.bench.report import PROFILE_COLUMNS, TABLE_COLUMNS
from layerline.runtime.bench.serve import BenchSettings, build_matrix
from layerline.runtime.bench.stats import (
    acceptance_counts,
    expected_passes,
    expected_tokens_per_pass,
    step_sizes,
)

# ---------------------------------------------------------------- reading steps from a stream


def test_steps_are_read_from_the_widest_gaps_between_tokens():
    # Three passes: 3 tokens back to back, then 2, then 1.
    arrivals = [0.100, 0.1001, 0.1002, 0.200, 0.2001, 0.300]
    assert step_sizes(arrivals, 3) == [3, 2, 1]
    assert step_sizes(arrivals, 1) == [6]


def test_steps_are_not_guessed_when_the_gaps_do_not_separate_them():
    evenly_spaced = [0.1, 0.2, 0.3, 0.4]
    assert step_sizes(evenly_spaced, 2) is None
    assert step_sizes([0.1, 0.2], 3) is None  # fewer tokens than passes


def test_acceptance_counts_rejections_and_the_windows_cut_by_max_tokens():
    # Window 4, 24 tokens: four full steps of 5, then a step cut to 3 drafts by max_tokens.
    assert acceptance_counts([5, 5, 5, 5, 4], 4, 24, "length") == (19, 0)
    # An early rejection (3 of 5), then a full step; the last step ended on end-of-text.
    assert acceptance_counts([3, 5, 2], 4, 24, "stop") == (6, 1)


def test_expected_tokens_per_pass_follows_the_formula_for_long_outputs():
    assert expected_tokens_per_pass(0.0, 8) == 1.0
    assert expected_tokens_per_pass(1.0, 8) == 9.0
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1.75)
    long_run = 10_000 / expected_passes(10_000, 4, 0.7, 10_000)
    assert long_run == pytest.approx(expected_tokens_per_pass(0.7, 4), rel=1e-3)
    # Short outputs: the last windows are cut, so fewer tokens per pass.
    assert 24 / expected_passes(24, 4, 1.0, 24) == pytest.approx(4.8)


# ---------------------------------------------------------------- the matrix


def test_matrix_compares_splits_with_the_single_stage_and_drafts_with_their_split():
    settings = BenchSettings(target="t", draft="d", stages=(2, 3), draft_stages=(2,), windows=(4, 8),
                             adaptive=True, delays_ms=(0.0, 5.0), llama_server=Path("/bin/true"))
    conditions = {c.name: c for c in build_matrix(settings)}
    assert list(conditions) == [
        "single",
        "split2", "split2 + draft w=4", "split2 + draft w=8", "split2 + draft adaptive", "split3",
        "split2 @5ms", "split2 + draft w=4 @5ms", "split2 + draft w=8 @5ms",
        "split2 + draft adaptive @5ms", "split3 @5ms",
        "llama.cpp", "llama.cpp + draft w=4", "llama.cpp + draft w=8",
    ]
    assert conditions["split3 @5ms"].baseline == "single"
    assert conditions["split2 + draft w=8 @5ms"].baseline == "split2 @5ms"
    assert conditions["split2 + draft w=8 @5ms"].delay_ms == 5.0
    assert conditions["llama.cpp + draft w=4"].baseline == "llama.cpp"


def test_matrix_without_a_draft_has_no_draft_conditions():
    conditions = build_matrix(BenchSettings(target="t", stages=(2,)))
    assert [c.name for c in conditions] == ["single", "split2"]


# ---------------------------------------------------------------- a real quick run


def test_quick_benchmark_reports_every_condition_and_column_and_a_png_chart(tiny_llama_package, tmp_path):
    out = tmp_path / "bench"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "layerline", "bench", "serve", str(tiny_llama_package),
         "--draft", str(tiny_llama_package), "--stages", "2", "--window", "2", "--no-adaptive",
         "--link-delay-ms", "0", "--link-delay-ms", "5", "--runs", "1", "--warmup", "1",
         "--max-tokens", "6", "--prompt", "The capital of France is", "--start-timeout", "120",
         "-o", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    print(f"bench serve took {time.monotonic() - started:.1f} s")
    names = ["single", "split2", "split2 + draft w=2", "split2 @5ms", "split2 + draft w=2 @5ms"]

    table = (out / "table.md").read_text()
    assert table in done.stdout
    header = "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert header in table and "| " + " | ".join(PROFILE_COLUMNS) + " |" in table
    main_table = table[table.index(header):].split("\n\n")[0].splitlines()[2:]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in main_table}
    assert list(rows) == names
    for name in names:
        assert rows[name].count(" | ") == len(TABLE_COLUMNS) - 1
        assert "failed" not in rows[name]

    results = json.loads((out / "results.json").read_text())
    by_name = {c["condition"]["name"]: c for c in results["conditions"]}
    assert list(by_name) == names
    for name in names:
        stats = by_name[name]["stats"]
        assert by_name[name]["error"] is None
        for key in ("tokens_per_s", "wall_s", "ttft_s", "tokens_per_pass"):
            assert stats[key] > 0, (name, key)
        assert len(by_name[name]["requests"]) == 1
    assert by_name["split2"]["vs_baseline"] > 0
    for name in ("split2 + draft w=2", "split2 + draft w=2 @5ms"):
        stats = by_name[name]["stats"]
        assert stats["accept_rate"] is not None and stats["draft_ms"] > 0
        assert by_name[name]["requests"][0]["usage"]["speculative"]["enabled"] is True
    delayed = by_name["split2 @5ms"]["link"]
    assert delayed["method"] in ("netem", "proxy")
    assert delayed["traffic"][0]["bytes_to_target"] > 0 and delayed["traffic"][0]["bytes_from_target"] > 0
    assert by_name["split2"]["link"]["method"] == "loopback"

    png = (out / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR" and png.endswith(b"IEND\xaeB`\x82")


def test_transport_benchmark_measures_both_transports_through_two_hops():
    done = subprocess.run([sys.executable, "-m", "layerline", "bench", "transport", "--frames", "20",
                           "--pause-ms", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| gRPC", "| TCP"))]
    assert len(rows) == 4 and all(float(row.split("|")[4]) > 0 for row in rows)
