"""Keep the Helm chart in step with the application it deploys (`make chart-sync`).

Two things in k8s/motionserve/ are derived from the code and must never be edited by hand:

* ``files/serve/<tier>.yaml``: byte-identical copies of ``serve/configs/<tier>.yaml``, the Serve
  deploy configs the RayService's ``serveConfigV2`` is rendered from (Helm can only read files
  inside the chart directory);
* the ``AppArgs*`` definitions in ``values.schema.json``: the JSON schema of
  ``serve.config.AppArgs``, so a typo in ``serve.appArgs`` fails ``helm lint``/``helm install``;
* the values table in the chart's README.md, built from the ``# --`` comments of values.yaml.

``python k8s/chart_sync.py`` rewrites both; ``--check`` only reports drift (exit 1).
tests/k8s/test_chart_sync.py fails when they drift.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "k8s" / "motionserve"
SERVE_CONFIGS = ROOT / "serve" / "configs"
CHART_SERVE_CONFIGS = CHART / "files" / "serve"
VALUES_SCHEMA = CHART / "values.schema.json"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
TABLE_START, TABLE_END = "<!-- values-table:start -->", "<!-- values-table:end -->"
TIERS = ("dev", "mvp", "scale")  # local.yaml is for one machine, not for Kubernetes
APP_ARGS_PREFIX = "AppArgs"
# Schema keywords kept from pydantic's output; titles and defaults only add noise to the chart.
_KEEP = {
    "type",
    "enum",
    "const",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "description",
    "properties",
    "items",
    "anyOf",
    "required",
    "$ref",
    "additionalProperties",
}


def _strict(node: Any) -> Any:
    """Drop noise keywords, rename refs into the chart's $defs and forbid unknown keys."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key == "$ref":
            out[key] = value.replace("#/$defs/", f"#/$defs/{APP_ARGS_PREFIX}_")
        else:
            out[key] = _strict(value)
    if "properties" in out:
        # Stricter than pydantic where a nested model ignores extras: a typo must fail.
        out["additionalProperties"] = False
    return out


def app_args_defs() -> dict[str, Any]:
    """The `$defs` entries values.schema.json must hold for `serve.appArgs`."""
    sys.path.insert(0, str(ROOT))
    from serve.config import AppArgs

    schema = AppArgs.model_json_schema()
    nested = schema.pop("$defs", {})
    defs = {APP_ARGS_PREFIX: _strict(schema)}
    for name, sub in sorted(nested.items()):
        defs[f"{APP_ARGS_PREFIX}_{name}"] = _strict(sub)
    return defs


def synced_schema(current: dict[str, Any]) -> dict[str, Any]:
    """`current` with its AppArgs definitions replaced by freshly generated ones."""
    defs = {
        name: sub
        for name, sub in current.get("$defs", {}).items()
        if not name.startswith(APP_ARGS_PREFIX)
    }
    defs.update(app_args_defs())
    return {**current, "$defs": defs}


def render_schema(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def documented_values(text: str) -> list[tuple[tuple[str, ...], str]]:
    """(key path, description) for every key with a helm-docs ``# --`` comment, in order."""
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if body.startswith("--"):
                comment = [body[2:].strip()]
            elif comment:
                comment.append(body)
            continue
        if not stripped or stripped.startswith("-") or ":" not in stripped:
            comment = []
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":", 1)[0].strip().strip("\"'")
        if comment:
            found.append((tuple(k for _, k in stack) + (key,), " ".join(comment)))
        comment = []
        stack.append((indent, key))
    return found


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def values_table() -> str:
    import yaml

    text = VALUES.read_text()
    values = yaml.safe_load(text)
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for path, description in documented_values(text):
        default: Any = values
        for part in path:
            default = default[part]
        kind = {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(
            type(default), "object"
        )
        shown = _markdown_cell(json.dumps(default, separators=(", ", ": ")))
        rows.append(f"| `{'.'.join(path)}` | {kind} | `{shown}` | {_markdown_cell(description)} |")
    return "\n".join(rows)


def synced_readme(text: str) -> str:
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return f"{text[:start]}\n{values_table()}\n{text[end:]}"


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def drift() -> list[str]:
    """Human-readable list of what is out of date (empty when the chart is in sync)."""
    problems = []
    for tier in TIERS:
        source, copy = SERVE_CONFIGS / f"{tier}.yaml", CHART_SERVE_CONFIGS / f"{tier}.yaml"
        if not copy.is_file() or copy.read_bytes() != source.read_bytes():
            problems.append(f"{_show(copy)} differs from {_show(source)}")
    text = VALUES_SCHEMA.read_text()
    if text != render_schema(synced_schema(json.loads(text))):
        problems.append(f"{_show(VALUES_SCHEMA)}: AppArgs definitions are stale")
    readme = README.read_text()
    if readme != synced_readme(readme):
        problems.append(f"{_show(README)}: the values table is stale")
    return problems


def sync() -> None:
    CHART_SERVE_CONFIGS.mkdir(parents=True, exist_ok=True)
    for tier in TIERS:
        (CHART_SERVE_CONFIGS / f"{tier}.yaml").write_bytes(
            (SERVE_CONFIGS / f"{tier}.yaml").read_bytes()
        )
    schema = synced_schema(json.loads(VALUES_SCHEMA.read_text()))
    VALUES_SCHEMA.write_text(render_schema(schema))
    README.write_text(synced_readme(README.read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, change nothing")
    if parser.parse_args().check:
        problems = drift()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `make chart-sync`", file=sys.stderr)
        return 1 if problems else 0
    sync()
    print(f"synced {_show(CHART)} with serve/configs and serve.config.AppArgs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
