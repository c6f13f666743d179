"""benchmarks/common.py and the batching benchmark's policy comparison."""

from benchmarks import batching, common


def test_results_go_where_the_environment_says_else_by_device(tmp_path, monkeypatch):
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path / "quick"))
    assert common.results_dir() == tmp_path / "quick" and (tmp_path / "quick").is_dir()
    monkeypatch.delenv(common.RESULTS_ENV)
    expected = common.RESULTS_ROOT
    if common.gpu_name():
        expected = expected / common.device_slug(common.gpu_name())
    assert common.results_dir() == expected
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_machine_label_names_the_device_and_the_load():
    summary = common.machine_summary()
    label = common.machine_label(summary)
    assert f"{summary['cpu_count']} cores" in label and "load" in label
    assert common.machine_label({**summary, "gpu": "NVIDIA L4"}).startswith("NVIDIA L4,")


def row(keys, load, fill, seconds):
    return {"keys": keys, "load": load, "fill_rate": fill, "device_s_per_frame": seconds}


def test_policy_gains_pairs_rows_by_keys_and_load():
    mixed = {
        "by_policy": [
            {"policy": "keyed", "rows": [row(1, 2.0, 0.6, 0.04), row(3, 2.0, 0.5, 0.05)]},
            {"policy": "serve.batch", "rows": [row(3, 2.0, 0.25, 0.1), row(1, 2.0, 0.3, 0.05)]},
        ]
    }
    gains = batching.policy_gains(mixed)
    assert gains == [
        {"keys": 1, "load": 2.0, "keyed_fill": 0.6, "serve_batch_fill": 0.3,
         "device_s_change_pct": -20.0},
        {"keys": 3, "load": 2.0, "keyed_fill": 0.5, "serve_batch_fill": 0.25,
         "device_s_change_pct": -50.0},
    ]  # fmt: skip
    assert batching.policy_gains({"by_policy": mixed["by_policy"][:1]}) == []


def test_write_json_creates_folders_and_round_trips(tmp_path):
    import json
    from datetime import date

    path = common.write_json(tmp_path / "a" / "b.json", {"x": [1, 2.5]})
    assert json.loads(path.read_text()) == {"x": [1, 2.5]} and path.read_text().endswith("\n")
    stamped = common.write_json(tmp_path / "c.json", {"d": date(2026, 11, 25)}, default=str)
    assert json.loads(stamped.read_text()) == {"d": "2026-11-25"}
