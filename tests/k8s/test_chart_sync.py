"""What the chart copies from the code stays identical to it (`make chart-sync` fixes drift)."""

from __future__ import annotations

import json

import pytest

from .conftest import CHART, REPO, load_script

sync = load_script("chart_sync")


@pytest.mark.parametrize("tier", ["dev", "mvp", "scale"])
def test_chart_serve_configs_are_byte_identical_to_serve_configs(tier):
    copy = CHART / "files" / "serve" / f"{tier}.yaml"
    assert copy.read_bytes() == (REPO / "serve" / "configs" / f"{tier}.yaml").read_bytes(), (
        f"{copy} drifted from serve/configs/{tier}.yaml: run `make chart-sync`"
    )


def test_only_tier_configs_are_packaged():
    assert sorted(p.name for p in (CHART / "files" / "serve").iterdir()) == [
        "dev.yaml",
        "mvp.yaml",
        "scale.yaml",
    ]


def test_nothing_has_drifted():
    assert sync.drift() == [], "run `make chart-sync`"


def test_values_schema_app_args_follow_the_model():
    schema = json.loads((CHART / "values.schema.json").read_text())
    app_args = schema["$defs"]["AppArgs"]
    from serve.config import AppArgs

    assert set(app_args["properties"]) == set(AppArgs.model_fields)
    assert app_args["additionalProperties"] is False
    assert schema["properties"]["serve"]["properties"]["appArgs"] == {"$ref": "#/$defs/AppArgs"}


def test_drift_is_detected(tmp_path, monkeypatch):
    """The check is not vacuous: an edited copy and a stale schema are both reported."""
    chart = tmp_path / "chart"
    (chart / "files" / "serve").mkdir(parents=True)
    for tier in sync.TIERS:
        (chart / "files" / "serve" / f"{tier}.yaml").write_bytes(
            (CHART / "files" / "serve" / f"{tier}.yaml").read_bytes()
        )
    (chart / "files" / "serve" / "dev.yaml").write_text("proxy_location: HeadOnly\n")
    schema = json.loads((CHART / "values.schema.json").read_text())
    del schema["$defs"]["AppArgs"]["properties"]["tier"]
    (chart / "values.schema.json").write_text(json.dumps(schema))
    (chart / "values.yaml").write_text("# -- A value.\nkey: 1\n")
    (chart / "README.md").write_text(f"{sync.TABLE_START}\nold\n{sync.TABLE_END}\n")
    monkeypatch.setattr(sync, "CHART_SERVE_CONFIGS", chart / "files" / "serve")
    monkeypatch.setattr(sync, "VALUES_SCHEMA", chart / "values.schema.json")
    monkeypatch.setattr(sync, "VALUES", chart / "values.yaml")
    monkeypatch.setattr(sync, "README", chart / "README.md")
    monkeypatch.setattr(sync, "SERVE_CONFIGS", REPO / "serve" / "configs")
    problems = sync.drift()
    assert len(problems) == 3, problems
    sync.sync()
    assert sync.drift() == []
    assert "| `key` | int | `1` | A value. |" in (chart / "README.md").read_text()
