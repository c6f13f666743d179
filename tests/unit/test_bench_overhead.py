"""benchmarks/overhead.py: the pure parts (clip looping, report checks, summary, table, plot)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import fixtures, overhead


def _report(cache_hits: int = 0, diffusion_calls: int = 8) -> dict:
    def stage(name: str, calls: int, seconds: float, load: float = 0.0) -> dict:
        return {"stage": name, "calls": calls, "cache_hits": cache_hits if name == "pose" else 0,
                "seconds": seconds, "wall_seconds": seconds * 2, "load_seconds": load}  # fmt: skip

    stages = [stage("pose", 1, 2.0), stage("diffusion", diffusion_calls, 5.0, load=4.0)]
    return {"plan": {"stages": stages, "generated_frames": 120}}


def _round(seconds: float, **extra) -> dict:
    return {"seconds": seconds, "submit_to_done_s": seconds - 0.1, "server_job_s": seconds - 0.2,
            "cpu_seconds": seconds * 1.1, "model_load_s": 0.0, "diffusion_batches": [4, 4],
            **overhead.report_summary(_report()), **extra}  # fmt: skip


def test_ping_pong_plays_back_and_forth_without_repeating_the_turns():
    frames = np.arange(5)[:, None]
    looped = fixtures.ping_pong(frames, 12)
    assert looped[:, 0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3]


def test_report_summary_rejects_cache_hits_and_missing_diffusion():
    with pytest.raises(RuntimeError, match="not a fresh run"):
        overhead.report_summary(_report(cache_hits=1))
    with pytest.raises(RuntimeError, match="not a fresh run"):
        overhead.report_summary(_report(diffusion_calls=0))
    summary = overhead.report_summary(_report())
    assert summary["chunks"] == 8
    assert summary["stage_seconds"] == {"pose": 2.0, "diffusion": 5.0}


def test_ledger_facts_counts_batches_and_sums_load_shares():
    ledger = [
        {"stage": "diffusion", "notes": ["batch of 3 chunk(s)"], "load_s": 1.0},
        {"stage": "diffusion", "notes": ["batch of 3 chunk(s)"], "load_s": 1.0},
        {"stage": "diffusion", "notes": ["batch of 3 chunk(s)"], "load_s": 0.5},
        {"stage": "diffusion", "notes": ["batch of 1 chunk(s)"], "load_s": 0.0},
        {"stage": "pose", "notes": [], "load_s": 0.0},
    ]
    facts = overhead.ledger_facts(ledger)
    assert facts["diffusion_batches"] == [3, 1]
    assert facts["model_load_s"] == 2.5


def test_summary_compares_the_best_rounds_and_the_table_and_plot_show_it(tmp_path):
    in_process = [_round(10.0), _round(12.0)]
    serve_block = {"warm": [_round(11.0), _round(11.5)], "cold_start_s": 30.0,
                   "idle_cpu_cores": 0.15, "first": _round(20.0, model_load_s=4.0)}  # fmt: skip
    summary = overhead.summarize(in_process, serve_block)
    assert summary["ratio_best"] == 1.1
    assert summary["meets_target"] is True
    assert summary["first_minus_warm_s"] == 9.0
    result = {"summary": summary, "in_process": in_process, "serve_warm": serve_block["warm"]}
    table = overhead.format_table(result)
    assert "Serve / in process: 1.100" in table and "met" in table
    path = tmp_path / "overhead.png"
    overhead.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
