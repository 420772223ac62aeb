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

from layerline.errors import LayerlineError
from layerline.runtime.bench.client import RequestSample
from layerline.runtime.bench.report import (
    LOAD_COLUMNS,
    MEAN_BATCH_COLUMN,
    PROFILE_COLUMNS,
    TABLE_COLUMNS,
    render_load,
)
from layerline.runtime.bench.serve import (
    BenchSettings,
    Condition,
    ConditionResult,
    LoadLevel,
    Models,
    build_matrix,
    level_mean_batch,
    speculation_config,
    stage0_args,
)
from layerline.runtime.bench.servers import check_stage_serve_accepts
from layerline.runtime.bench.stats import (
    acceptance_counts,
    expected_passes,
    expected_tokens_per_pass,
    percentile,
    solo_answers,
    step_sizes,
    summarize_load,
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


MODELS = Models(package=Path("target"), draft_package=Path("draft"), hidden_size=64)


def test_tree_conditions_sit_beside_the_chains_of_their_split():
    settings = BenchSettings(target="t", draft="d", stages=(2,), windows=(4,), adaptive=False,
                             trees=("auto", "4,2,6"), delays_ms=(20.0,))
    conditions = {c.name: c for c in build_matrix(settings)}
    assert list(conditions) == ["single", "split2 @20ms", "split2 + draft w=4 @20ms",
                                "split2 + draft tree auto @20ms", "split2 + draft tree 4,2,6 @20ms"]
    tree = conditions["split2 + draft tree auto @20ms"]
    assert tree.baseline == "split2 @20ms" and tree.tree == "auto" and tree.fixed_window is None
    assert 'tree = "auto"' in speculation_config(settings, MODELS, tree)
    assert "tree" not in speculation_config(settings, MODELS, conditions["split2 + draft w=4 @20ms"])
    with pytest.raises(LayerlineError, match="tree"):
        BenchSettings(target="t", draft="d", trees=("wide",))


def test_matrix_without_a_draft_has_no_draft_conditions():
    conditions = build_matrix(BenchSettings(target="t", stages=(2,)))
    assert [c.name for c in conditions] == ["single", "split2"]


# ---------------------------------------------------------------- many clients at once


def test_percentiles_interpolate_between_the_nearest_ranks():
    assert percentile([3.0], 90) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([float(v) for v in range(11)], 90) == pytest.approx(9.0)


def _sample(client: int, prompt: int, sent_at: float, arrivals: list[float], text: str, run: int = 0):
    return RequestSample(prompt, run, arrivals[0], arrivals[-1] + 0.01, len(arrivals), arrivals, "length",
                         text, client=client, sent_at=sent_at)


def test_load_figures_span_every_client_and_compare_answers_with_the_solo_ones():
    solo = solo_answers([_sample(0, 0, 1.0, [0.1, 0.2], "Paris"), _sample(0, 1, 2.0, [0.1, 0.2], "four"),
                         _sample(0, 0, 3.0, [0.1, 0.2], "other", run=1)])
    assert solo == {0: "Paris", 1: "four"}  # the first measured answer of each prompt
    samples = [_sample(0, 0, 10.0, [0.5, 1.0, 1.5], "Paris"), _sample(1, 1, 10.1, [0.9, 1.9], "four"),
               _sample(1, 0, 12.1, [0.3, 2.9], "Pari")]
    stats = summarize_load(samples, clients=2, solo=solo)
    assert stats.wall_s == pytest.approx(15.0 - 10.0)  # first request sent -> last token, across clients
    assert stats.tokens == 7 and stats.aggregate_tokens_per_s == pytest.approx(7 / 5.0)
    assert stats.ttft_p50_s == pytest.approx(0.5)
    assert stats.same_text == pytest.approx(2 / 3) and stats.mismatches == ((1, 0, 0),)
    assert stats.to_json()["mismatches"] == [{"client": 1, "run": 0, "prompt_index": 0}]


def test_stage0_gets_room_for_every_client_and_max_batch_only_when_asked():
    assert BenchSettings(target="t").client_levels == ()  # one client: no concurrency axis
    assert BenchSettings(target="t", clients=(8, 4)).client_levels == (1, 4, 8)
    assert stage0_args(BenchSettings(target="t")) == ["--max-queue", "32"]
    assert stage0_args(BenchSettings(target="t", clients=(1, 4, 8, 16))) == ["--max-queue", "32"]
    assert stage0_args(BenchSettings(target="t", clients=(1, 32), max_batch=8)) == [
        "--max-queue", "64", "--max-sessions", "32", "--max-batch", "8"]
    with pytest.raises(LayerlineError, match="--clients"):
        BenchSettings(target="t", clients=(0, 4))


def test_load_table_shows_mean_batch_only_when_stage0_reports_it():
    samples = [_sample(0, 0, 1.0, [0.1, 0.2], "Paris")]
    load = summarize_load(samples, clients=1, solo={0: "Paris"})
    plain = ConditionResult(Condition("split2", "layerline", 2), load=[LoadLevel(1, load, samples, 1.0)])
    assert MEAN_BATCH_COLUMN not in render_load([plain])
    batched = ConditionResult(Condition("split2", "layerline", 2), load=[
        LoadLevel(1, load, samples, 1.0, {"mean_batch": 1.0}),
        LoadLevel(4, None, error="4 of 4 clients failed; client 0: 429")])
    table = render_load([batched]).splitlines()
    assert table[0].endswith(f"| same text | {MEAN_BATCH_COLUMN} |")
    assert table[2].endswith("| 100% | 1.00 |") and "failed: 4 of 4 clients failed" in table[3]
    assert all(line.count(" | ") == len(LOAD_COLUMNS) for line in [table[0], *table[2:]])


def test_mean_batch_of_a_level_counts_only_the_passes_during_it():
    before = {"batch_sizes": {"1": 10}, "mean_batch": 1.0}
    after = {"batch_sizes": {"1": 12, "4": 6}, "mean_batch": 2.0}
    assert level_mean_batch(before, after) == pytest.approx((2 * 1 + 6 * 4) / 8)
    assert level_mean_batch(None, {"mean_batch": 3.5}) == 3.5  # no histogram: the server's own mean
    assert level_mean_batch(None, None) is None


def test_an_option_stage_serve_lacks_is_refused_before_any_condition_runs():
    check_stage_serve_accepts(["--max-queue", "--max-sessions"])
    with pytest.raises(LayerlineError, match="has no --max-batch-of-nothing") as refused:
        check_stage_serve_accepts(["--max-queue", "--max-batch-of-nothing"])
    assert "leave the option out" in (refused.value.hint or "")


# ---------------------------------------------------------------- a real quick run


@pytest.mark.slow
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

    _assert_png(out / "chart.png")
    assert not (out / "concurrency.png").exists() and "Many clients" not in table  # one client by default
    assert all(c["concurrency"] == [] for c in results["conditions"])


def _assert_png(path: Path) -> None:
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR" and png.endswith(b"IEND\xaeB`\x82")


@pytest.mark.slow
def test_quick_benchmark_with_concurrent_clients_reports_each_count_and_the_same_text_share(
        tiny_llama_package, tmp_path):
    out = tmp_path / "bench"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "layerline", "bench", "serve", str(tiny_llama_package), "--stages", "2",
         "--clients", "1,2", "--runs", "1", "--warmup", "1", "--max-tokens", "5",
         "--prompt", "The capital of France is", "--prompt", "Two plus two is", "--start-timeout", "120",
         "-o", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    print(f"bench serve --clients 1,2 took {time.monotonic() - started:.1f} s")

    table = (out / "table.md").read_text()
    header = "| " + " | ".join(LOAD_COLUMNS)
    assert header in table
    load_table = table[table.index(header):].split("\n\n")[0].splitlines()[2:]
    rows = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in load_table]
    assert [(r[0], r[1]) for r in rows] == [("single", "1"), ("single", "2"), ("split2", "1"),
                                            ("split2", "2")]
    same = LOAD_COLUMNS.index("same text")
    for row in rows:
        assert row[same].endswith("%"), row
        assert float(row[LOAD_COLUMNS.index("aggregate tok/s")]) > 0

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["clients"] == [1, 2]
    for condition in results["conditions"]:
        one, two = condition["concurrency"]
        assert (one["clients"], two["clients"]) == (1, 2) and two["error"] is None
        assert one["vs_one_client"] == 1.0 and two["vs_one_client"] > 0
        assert len(two["requests"]) == 2 * 2  # 2 clients x 2 prompts x 1 run
        assert {r["client"] for r in two["requests"]} == {0, 1}
        stats = two["stats"]
        assert stats["clients"] == 2 and stats["aggregate_tokens_per_s"] > 0
        assert 0 <= stats["same_text"] <= 1 and stats["ttft_p90_s"] >= stats["ttft_p50_s"] > 0
        assert "batching" in two  # stage 0's `/v1/status` -> `batching`, once it has one
    _assert_png(out / "concurrency.png")


def test_transport_benchmark_measures_both_transports_through_two_hops():
    done = subprocess.run([sys.executable, "-m", "layerline", "bench", "transport", "--frames", "20",
                           "--pause-ms", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| gRPC", "| TCP"))]
    assert len(rows) == 4 and all(float(row.split("|")[4]) > 0 for row in rows)
