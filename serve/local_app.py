"""The app on a private local Ray cluster: what `motionserve serve` and `motionserve demo` run.

The cluster is always a new one owned by this process (`address="local"`), never another Ray
cluster running on the machine, and it stops when the context exits.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_config(path: Path | None = None, port: int | None = None) -> dict[str, Any]:
    """A Serve config file as a dict; `port` replaces its HTTP port."""
    config = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text())
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    return config


@contextlib.contextmanager
def local_app(
    config: dict[str, Any], metrics_port: int | None = None, quiet: bool = False
) -> Iterator[str]:
    """Start Ray and every application of `config`; yields the HTTP base URL once they run.
    `quiet` keeps the replicas' logs in Ray's log files instead of this terminal."""
    import logging

    import ray
    from ray import serve as ray_serve

    from serve.app import build_app

    http = config.get("http_options", {})
    options: dict[str, Any] = {"address": "local", "include_dashboard": False}
    if quiet:
        options.update(log_to_driver=False, logging_level=logging.WARNING)
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if metrics_port is not None:
        options["_metrics_export_port"] = metrics_port
    ray.init(**options)
    try:
        ray_serve.start(http_options=http, proxy_location=config.get("proxy_location", "HeadOnly"))
        for app in config["applications"]:
            built = build_app(app.get("args", {}), deployment_overrides=app.get("deployments", []))
            # serve.run returns once the application's deployments are running
            ray_serve.run(built, name=app["name"], route_prefix=app.get("route_prefix", "/"))
        yield f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    finally:
        with contextlib.suppress(Exception):
            ray_serve.shutdown()
        ray.shutdown()
