"""The app on a private local Ray cluster: what `motionserve serve` and `motionserve demo` run.

The cluster is always a new one owned by this process (`address="local"`), never another Ray
cluster running on the machine, and it stops when the context exits, in a bounded time:

1. the ingress replicas stop first (Serve's graceful stop, which runs `IngressServer.__del__`):
   they cancel their running jobs without ending them and release their leases, so the
   manifests stay `running` and the next start resumes them at once;
2. Serve shuts down, for at most `SERVE_STOP_GRACE_S` (it would otherwise wait up to each
   deployment's `graceful_shutdown_timeout_s` for chunks nobody awaits any more);
3. Ray shuts down. What outlives it is killed by `motionserve serve`'s supervisor
   (serve/process_group.py), which also bounds the whole stop.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"

INGRESS_HAND_BACK_S = 5.0
"""How long the ingress replicas get to hand their jobs back before Serve is shut down."""
SERVE_STOP_GRACE_S = 6.0
"""How long Serve's own shutdown may take before Ray is shut down under it."""

logger = logging.getLogger(__name__)


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
        stop(app["name"] for app in config["applications"])


def stop(app_names) -> None:
    """Hand the running jobs back, then stop Serve and Ray, each step bounded (see above)."""
    import ray
    from ray import serve as ray_serve

    if not ray.is_initialized():  # ray.init failed: nothing to stop
        return
    try:
        hand_back_jobs(list(app_names), INGRESS_HAND_BACK_S)
    except Exception:  # Serve or Ray never started, or died: nothing to hand back then
        logger.warning("could not stop the ingress replicas first", exc_info=True)
    stopping = threading.Thread(target=_quietly(ray_serve.shutdown), daemon=True)
    stopping.start()
    stopping.join(SERVE_STOP_GRACE_S)
    if stopping.is_alive():
        logger.warning("Serve did not stop within %g s; stopping Ray under it", SERVE_STOP_GRACE_S)
    ray.shutdown()


def hand_back_jobs(app_names: list[str], timeout_s: float) -> int:
    """Stop the ingress replicas of `app_names` gracefully before anything else: each one's
    `__del__` hands its jobs back (serve/app.py). Serve stops all deployments at once, so
    without this a stage replica could vanish under a job before its ingress let go of it.
    Returns how many replicas stopped within `timeout_s`."""
    import ray

    # Serve names each replica actor SERVE_REPLICA::<app>#<deployment>#<id>, namespace "serve";
    # perform_graceful_shutdown is what its controller calls to stop one (at most once).
    prefixes = tuple(f"SERVE_REPLICA::{name}#Ingress#" for name in app_names)
    actors = [
        ray.get_actor(entry["name"], namespace="serve")
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == "serve" and entry["name"].startswith(prefixes)
    ]
    stops = [actor.perform_graceful_shutdown.remote() for actor in actors]
    done, _ = ray.wait(stops, num_returns=len(stops), timeout=timeout_s)
    return len(done)


def _quietly(function):
    def run() -> None:
        with contextlib.suppress(Exception):
            function()

    return run
