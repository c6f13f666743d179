"""Settings come from one registry, and the README's table is generated from it."""

from __future__ import annotations

from pathlib import Path

from serve.config import Settings, env_var_table


def test_readme_lists_every_environment_variable():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert env_var_table() in readme, "regenerate the README table with env_var_table()"


def test_environment_overrides_limits(monkeypatch):
    monkeypatch.setenv("MOTIONSERVE_MAX_DURATION_S", "12.5")
    monkeypatch.setenv("MOTIONSERVE_STORAGE_URI", "s3://bucket/prefix")
    settings = Settings()
    assert settings.input_limits().max_duration_s == 12.5
    assert settings.resolved_storage_uri() == "s3://bucket/prefix"


def test_every_setting_is_described():
    assert all(field.description for field in Settings.model_fields.values())


def test_the_app_takes_the_environments_limits_unless_its_config_sets_them(monkeypatch):
    from deployments.video import InputLimits
    from serve.config import AppArgs

    monkeypatch.setenv("MOTIONSERVE_MAX_DURATION_S", "42")
    assert AppArgs().input_limits().max_duration_s == 42.0  # the same limit as the CLI's
    configured = AppArgs(limits=InputLimits(max_duration_s=7))
    assert configured.input_limits().max_duration_s == 7.0
