"""Every notebook runs on the CPU with its small parameters (nbmake mocks) and shows a plot.

Each ``notebooks/*.py`` (jupytext percent format) becomes an ``.ipynb`` beside it — the folder
a user opens it from, so its relative paths hold — and runs through nbmake's ``NotebookRun``,
which applies the ``nbmake.mock`` values of the parameters cell after it executes (no branch
for CI inside a notebook). The library functions behind the cells are tested here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))
FIXTURES = REPO.parent / "shared" / "fixtures"
NEEDS_FIXTURES = {"40_streaming_audio", "60_live_dry_run"}


def test_every_notebook_has_a_parameters_cell_with_cpu_mocks():
    import jupytext

    assert len(NOTEBOOKS) >= 7
    for path in NOTEBOOKS:
        nb = jupytext.read(path)
        code = [c for c in nb.cells if c.cell_type == "code"]
        params = code[0]
        assert "parameters" in params.metadata.get("tags", []), path.name
        assert "mock" in params.metadata.get("nbmake", {}), path.name
        for c in code[1:]:  # thin: no control flow over parameters in a cell
            assert not c.source.lstrip().startswith(("if ", "for device", "while ")), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_cpu_parameters_and_plots(path):
    import jupytext
    import nbformat
    from nbmake.nb_run import NotebookRun

    if path.stem in NEEDS_FIXTURES and not (FIXTURES / "eng.wav").exists():
        pytest.skip("needs ../shared/fixtures/eng.wav (the shared fixtures are absent)")
    out = path.with_suffix(".nbtest.ipynb")
    nbformat.write(jupytext.read(path), out)
    try:
        res = NotebookRun(out, default_timeout=600).execute()
        assert res.error is None, res.error.trace[-3000:]
        images = [
            o
            for c in res.nb.cells
            if c.cell_type == "code"
            for o in c.outputs
            if "image/png" in o.get("data", {})
        ]
        assert images, f"{path.name} showed no plot"
    finally:
        out.unlink(missing_ok=True)


# -- the library behind the cells ----------------------------------------------------------------


def test_results_round_trip_and_newest(tmp_path):
    from musetalk_rt.workbench import results

    (tmp_path / "2026-01-01_cpu_aaa").mkdir()
    (tmp_path / "2026-01-02_cpu_bbb").mkdir()
    (tmp_path / "2026-01-01_cpu_aaa" / "bench.jsonl").write_text(
        json.dumps({"scenario": "eager-fp32-b1", "fps": 1}) + "\n"
    )
    (tmp_path / "2026-01-02_cpu_bbb" / "bench.jsonl").write_text(
        json.dumps({"scenario": "eager-fp32-b1", "fps": 2})
        + "\n\n"
        + json.dumps({"scenario": "eager-fp32-b1", "fps": 9, "errata": "bug"})
        + "\n"
    )
    rows = results.load(tmp_path)
    assert [r["fps"] for r in rows] == [1, 2, 9]
    assert rows[0]["_file"] == "2026-01-01_cpu_aaa/bench.jsonl"
    assert results.newest(rows, "scenario")["eager-fp32-b1"]["fps"] == 2
    (tmp_path / "2026-01-02_cpu_bbb" / "bench.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bench.jsonl:1: not a JSON row"):
        results.load(tmp_path)


def _row(batch, fps, engine="eager", dtype="fp16", passed=True):
    return {
        "scenario": f"{engine}-{dtype}-b{batch}",
        "engine": engine,
        "dtype": dtype,
        "batch": batch,
        "fps": fps,
        "quality": {"passed": passed},
    }


def test_recommend_buckets_covers_the_load_or_says_it_does_not():
    from musetalk_rt.workbench import sweep

    rows = [_row(1, 40), _row(4, 150), _row(8, 260), _row(16, 420), _row(32, 470)]
    rec = sweep.recommend_buckets(rows, channels=8)  # 200 fps needed
    assert rec["covers"] and rec["largest"]["batch"] == 8
    assert rec["buckets"] == [1, 4, 8]
    rec = sweep.recommend_buckets(rows, channels=16)  # 400 fps: batch 16
    assert rec["largest"]["batch"] == 16 and rec["covers"]
    rec = sweep.recommend_buckets(rows, channels=24)  # 600 fps: nothing covers it
    assert not rec["covers"] and rec["largest"]["batch"] == 32
    assert "does NOT cover" in sweep.describe_recommendation(rec)
    failing = [_row(1, 40), _row(4, 999, passed=False)]
    assert sweep.recommend_buckets(failing, channels=2)["largest"]["batch"] == 1
    with pytest.raises(ValueError):
        sweep.recommend_buckets([{"scenario": "trt-fp16", "skipped": "no trt"}], 1)
    with pytest.raises(ValueError, match="ENGINE:DTYPE"):
        sweep.parse_scenarios(["eager-fp16"])


def test_waterfall_adds_up_to_the_measured_delay():
    from musetalk_rt.workbench import budget, results

    rows = results.load(REPO / "experiments" / "results", "e2e")
    summary = budget.find_e2e_summary(rows, engine="compile", gpu="H200", run="20261201T140322Z")
    assert summary["run"] == "20261201T140322Z" and summary["engine"] == "compile"
    parts = budget.waterfall(summary, player_buffer_ms=100)
    by = {p["part"]: p["ms"] for p in parts}
    d = summary["delay"]["delay_ms"]
    inside_d = sum(
        by[k]
        for k in (
            "look-ahead",
            "20 ms chunk",
            "whisper canvas",
            "batching wait + compute (2 batches)",
            "margin (blend inside)",
        )
    )
    assert inside_d == pytest.approx(d, abs=0.5)
    measured = by["voice→server"] + d + by["encode"] + by["transport"]
    p50 = summary["voice_to_received_ms"]["p50"]
    assert measured == pytest.approx(p50, rel=0.1)  # p50s of parts vs p50 of the sum
    assert by["total"] == pytest.approx(sum(p["ms"] for p in parts[:-1]), abs=0.5)
    with pytest.raises(ValueError, match="no e2e summary"):
        budget.find_e2e_summary(rows, engine="no-such-engine")


def test_parse_metrics_and_series():
    from musetalk_rt.workbench.dry_run import DryRunResult, parse_metrics

    text = (
        "# HELP musetalk_late_frames_total x\n# TYPE musetalk_late_frames_total counter\n"
        'musetalk_late_frames_total{channel="c0"} 3\nmusetalk_late_frames_total{channel="c1"} 5\n'
        "musetalk_gpu_batches_total{} 12\nbroken line\n"
    )
    m = parse_metrics(text)
    assert m['musetalk_late_frames_total{channel="c1"}'] == 5.0
    assert m["musetalk_gpu_batches_total{}"] == 12.0
    later = {**m, 'musetalk_late_frames_total{channel="c1"}': 6}
    res = DryRunResult(metrics=[(0.0, m), (1.0, later)])
    assert res.series("musetalk_late_frames_total", "c1") == ([0.0, 1.0], [5.0, 6.0])
    assert res.gpu_busy_share() is None and "GPU worker" not in res.summary()  # not measured
    gpu = [(0.0, {**m, "musetalk_gpu_busy_seconds_total{}": 1.0}), (4.0, {**later})]
    gpu[1][1]["musetalk_gpu_busy_seconds_total{}"] = 4.0
    res = DryRunResult(metrics=gpu)
    assert res.gpu_busy_share() == pytest.approx(0.75)
    assert "GPU worker: 12 batches; their GPU time 75%" in res.summary()


def test_environment_checks_name_the_fix(tmp_path):
    from musetalk_rt.workbench import env

    rows = env.environment_checks(tmp_path)  # an empty models folder
    by = {r["item"]: r for r in rows}
    assert by["weights"]["status"] == "missing"
    assert "musetalk-rt weights download" in by["weights"]["fix"]
    assert by["engine cache"]["status"] == "info"
    if by["torch-tensorrt"]["status"] == "missing":
        assert "make trt" in by["torch-tensorrt"]["fix"]
    text = env.format_checks(rows)
    assert "to fix:" in text and "weights" in text


def test_face_comparison_difference_is_the_largest_channel_difference():
    from musetalk_rt.workbench.quality import FaceComparison

    ref = np.zeros((1, 2, 2, 3), np.uint8)
    out = ref.copy()
    out[0, 0, 0] = (10, 200, 3)
    c = FaceComparison("x/fp16", ref, out, 0.0, 0.0)
    assert c.abs_diff[0, 0, 0] == 200 and c.abs_diff.sum() == 200


def test_dry_run_reads_back_sample_frames_of_a_fragmented_recording(tmp_path):
    """The live recordings are fragmented MP4s, whose header counts no frames: the dry run's
    sample strip must still get its frames, spread over the recording."""
    from musetalk_rt.live.output import AVStreamWriter
    from musetalk_rt.workbench.dry_run import _read_back

    path = tmp_path / "c0.mp4"
    w = AVStreamWriter(str(path), 64, 48, threads=1)
    for i in range(60):
        w.write(np.full((48, 64, 3), 20 + 3 * i, np.uint8), np.zeros(640, np.float32))
    w.close()
    total, kept = _read_back(path, 4)
    assert total == 60 and len(kept) == 4
    levels = [float(f.mean()) for f in kept]
    assert levels[0] == pytest.approx(20, abs=2) and levels[-1] == pytest.approx(20 + 3 * 59, abs=2)
