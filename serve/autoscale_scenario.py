"""The app on a fake autoscaling cluster (serve/fake_cluster.py), driven through the spot life
cycle: burst from zero GPU nodes, idle back to zero, a spot node hard-killed mid-job, a node
drained with a preemption notice mid-job, and the spot group without capacity (on-demand takes
the work). Used by tests/cluster/ (which asserts) and benchmarks/autoscale.py (which measures).

The Serve config is derived from serve/configs/scale.yaml: the same deployments and the same
placement idea (CPU stages on the CPU head, Diffusion on GPU nodes from zero, scaled by
ongoing requests), with smaller numbers, tiny models and a Lanczos upscaler on the head
(scale.yaml gives Upscale a quarter GPU; here every GPU node holds one Diffusion replica, so
a node's replica is the only thing on it and it goes when the replica goes).

Every wait is bounded and fails with what it waited for and the cluster's state.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve.client import Client
from serve.fake_cluster import FakeCluster, gpu_node_types, wait_for
from serve.local_app import free_port, load_config
from serve.schemas import JobRequest

logger = logging.getLogger(__name__)

SCALE_CONFIG = Path(__file__).parent / "configs" / "scale.yaml"
APP = "motionserve"
IDLE_TIMEOUT_S = 10.0  # GPU node types' idle_timeout_s (the chart's spot group: 120 s)
JOB_TIMEOUT_S = 180.0
SCALE_UP_TIMEOUT_S = 120.0
# A job: 2 s of video at the draft preset's generation rate in chunks of 4 frames.
JOB_OVERRIDES = {"generation_long_side": 128, "output_long_side": 192, "steps": 4,
                 "chunk_frames": 4}  # fmt: skip
# Replicas and handles report their queues to the autoscaler every 0.5 s (Serve's default 10 s
# would dominate scale-up here); environment variables, which replaced `metrics_interval_s`.
METRICS_PUSH_ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    # Where each object ref was made, in `objects_held` (a GPU node kept by a ref is named).
    "RAY_record_ref_creation_sites": "1",
}
CPU_STAGES = ("Ingress", "Video", "Pose", "Motion", "Interpolate", "Upscale")


def scenario_serve_config(storage_uri: str, port: int) -> dict[str, Any]:
    """scale.yaml with smaller numbers: one replica of each CPU stage on the head, Diffusion
    from zero to one replica per GPU node (0.75 GPU each, as in scale.yaml), tiny models."""
    config = copy.deepcopy(load_config(SCALE_CONFIG, port=port))
    config["http_options"]["host"] = "127.0.0.1"
    config["proxy_location"] = "HeadOnly"
    (app,) = config["applications"]
    app["args"].update(
        base_model="tiny",
        controlnet_model="tiny",
        upscaler_model="lanczos",
        storage_uri=storage_uri,
        max_chunks_in_flight=4,
        job_lease_s=60.0,
    )
    for deployment in app["deployments"]:
        name = deployment["name"]
        if name in CPU_STAGES:
            for key in ("autoscaling_config", "num_replicas"):
                deployment.pop(key, None)
            deployment["num_replicas"] = 1
            deployment["ray_actor_options"] = {"num_cpus": 0.25, "num_gpus": 0}
        elif name == "Diffusion":
            deployment["max_ongoing_requests"] = 8
            deployment["autoscaling_config"] = {
                "min_replicas": 0, "initial_replicas": 0, "max_replicas": 3,
                "target_ongoing_requests": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 2,
                "look_back_period_s": 2,
            }  # fmt: skip
            deployment["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": 0.75}
            deployment["user_config"] = {
                "max_batch_size": 2, "batch_wait_timeout_s": 0.05, "idle_unload_s": 5,
            }  # fmt: skip
            deployment["health_check_period_s"] = 2
            # A drained node's replica serves until the notice's deadline minus this grace
            # (or until its replacement runs), then finishes its queued chunks within it.
            deployment["graceful_shutdown_timeout_s"] = 20
        else:
            raise ValueError(f"scale.yaml has a deployment this scenario does not know: {name}")
    return config


def write_clip(path: Path, seconds: float = 2.0) -> Path:
    """A small synthetic clip (a bright block moving over black)."""
    from deployments.video import EncodeSettings, encode_mp4

    count = int(25 * seconds)
    frames = np.zeros((count, 96, 128, 3), np.uint8)
    for i, frame in enumerate(frames):
        x = (2 * i) % 100
        frame[30:60, x : x + 20] = 255
    encode_mp4(iter(frames), path, EncodeSettings(fps=25))
    return path


@dataclass
class Timeline:
    """Samples of the cluster (GPU nodes per group, Diffusion replicas, jobs running) and
    named events, in seconds since the scenario started."""

    t0: float = field(default_factory=time.monotonic)
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def event(self, name: str, **details: Any) -> float:
        at = self.now()
        self.events.append({"t": at, "event": name, **details})
        logger.info("t=%.1f %s %s", at, name, details or "")
        return at

    def first(self, name: str) -> float:
        return next(e["t"] for e in self.events if e["event"] == name)

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "events": self.events}


class Scenario:
    """One fake cluster with the app on it; phases are methods (see the module doc)."""

    def __init__(self, root: Path, idle_timeout_s: float = IDLE_TIMEOUT_S, spot_max: int = 3):
        self.root = root
        self.idle_timeout_s = idle_timeout_s
        self.cluster = FakeCluster(
            root / "c",
            gpu_node_types(spot_max=spot_max, idle_timeout_s=idle_timeout_s),
            env=METRICS_PUSH_ENV,
        )
        self.timeline = Timeline()
        self.port = free_port()
        self.client = Client(f"http://127.0.0.1:{self.port}", timeout_s=30)
        self.clip = write_clip(root / "clip.mp4")
        self.jobs_running = 0
        self._seed = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        import ray
        from ray import serve as ray_serve

        from serve.app import build_app

        self.cluster.start()
        self.timeline.event("head up")
        ray.init(address=self.cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        config = scenario_serve_config(str(self.root / "store"), self.port)
        ray_serve.start(http_options=config["http_options"], proxy_location="HeadOnly")
        (app,) = config["applications"]
        built = build_app(app["args"], deployment_overrides=app["deployments"])
        ray_serve.run(built, name=APP, route_prefix="/")
        wait_for(self._ready, 120, "the app's /readyz")
        self.timeline.event("app ready")
        self._sampler = threading.Thread(target=self._sample_forever, daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        import ray

        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(5)
        try:
            ray.shutdown()  # the driver only; the cluster's processes are killed below
        finally:
            self.cluster.stop()

    def _ready(self) -> bool:
        try:
            return self.client.http.get("/readyz").status_code == 200
        except Exception:
            return False

    # ------------------------------------------------------------------ observation

    def diffusion_replicas(self) -> int:
        from ray import serve as ray_serve

        app = ray_serve.status().applications.get(APP)
        if app is None or "Diffusion" not in app.deployments:
            return 0
        return app.deployments["Diffusion"].replica_states.get("RUNNING", 0)

    def gpu_nodes(self) -> dict[str, int]:
        counts = {"gpu-spot": 0, "gpu-ondemand": 0}
        for node in self.cluster.alive("gpu"):
            group = self.cluster.group_of(node)
            counts[group] = counts.get(group, 0) + 1
        return counts

    def sample(self) -> dict[str, Any]:
        nodes = self.gpu_nodes()
        row = {
            "t": self.timeline.now(),
            "spot": nodes["gpu-spot"],
            "on_demand": nodes["gpu-ondemand"],
            "diffusion": self.diffusion_replicas(),
            "jobs": self.jobs_running,
        }
        self.timeline.samples.append(row)
        return row

    def _sample_forever(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.sample()
            except Exception:  # a slow GCS answer: the next sample tries again
                logger.debug("sample failed", exc_info=True)

    def state(self) -> str:
        """The cluster as one line, for failure messages."""
        try:
            return f"nodes={self.cluster.describe()} diffusion={self.diffusion_replicas()}"
        except Exception as error:
            return f"(state unavailable: {error})"

    def wait(self, condition, timeout_s: float, what: str) -> Any:
        try:
            return wait_for(condition, timeout_s, what, poll_s=1.0)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; {self.state()}; logs: {self.cluster.log_dir()}") from None

    # ------------------------------------------------------------------ jobs

    def submit(self, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            self._seed += 1
            request = JobRequest(
                prompt="a dancer", preset="draft", seed=self._seed, overrides=JOB_OVERRIDES
            )
            ids.append(self.client.submit(self.clip, request)["job_id"])
        self.jobs_running += len(ids)
        return ids

    def statuses(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        return {job_id: self.client.status(job_id) for job_id in ids}

    def wait_jobs(self, ids: list[str], timeout_s: float = JOB_TIMEOUT_S) -> dict[str, dict]:
        """Every job's final status (done, failed or cancelled)."""
        final: dict[str, dict[str, Any]] = {}

        def ended() -> bool:
            for job_id in ids:
                if job_id not in final:
                    status = self.client.status(job_id)
                    if status["state"] in ("done", "failed", "cancelled"):
                        final[job_id] = status
                        self.jobs_running -= 1
            return len(final) == len(ids)

        self.wait(ended, timeout_s, f"{len(ids)} job(s) to end ({len(final)} ended)")
        return final

    def chunks_done(self, job_id: str) -> tuple[int, int]:
        progress = self.client.status(job_id).get("progress", {}).get("chunks") or {}
        return int(progress.get("done", 0)), int(progress.get("total", 0))

    def wait_mid_job(self, ids: list[str], timeout_s: float = JOB_TIMEOUT_S) -> None:
        """Until some job has checkpointed a chunk and every job still has chunks to run."""

        def mid() -> bool:
            progress = [self.chunks_done(job_id) for job_id in ids]
            started = any(done >= 1 for done, _ in progress)
            unfinished = all(total == 0 or done < total for done, total in progress)
            if not unfinished:
                raise RuntimeError(f"a job finished before the fault: {progress}")
            return started

        self.wait(mid, timeout_s, "a checkpointed chunk with work left in every job")

    def busiest_spot_node(self) -> str:
        """The spot node whose Diffusion replica burned the most CPU over the last second (the
        one with chunks in flight: a fault there is a fault under a job)."""
        candidates = {}
        for node in self.cluster.alive("gpu-spot"):
            for pid in self.cluster.node_pids(node.node_id):
                if DIFFUSION_TITLE in _cmdline(pid):
                    candidates[node.node_id] = pid
        if not candidates:
            raise RuntimeError(f"no spot node holds a Diffusion replica: {self.state()}")
        before = {node: _cpu_ticks(pid) for node, pid in candidates.items()}
        time.sleep(1.0)  # a CPU-time sample needs an interval
        return max(candidates, key=lambda n: _cpu_ticks(candidates[n]) - before[n])

    # ------------------------------------------------------------------ phases

    def burst(self, jobs: int = 6) -> dict[str, Any]:
        """(a) From zero GPU nodes, a burst of jobs: the spot group scales up, all complete."""
        assert self.gpu_nodes() == {"gpu-spot": 0, "gpu-ondemand": 0}, self.state()
        start = self.timeline.event("burst submitted", jobs=jobs)
        ids = self.submit(jobs)
        self.wait(lambda: self.gpu_nodes()["gpu-spot"] > 0, SCALE_UP_TIMEOUT_S, "a spot node")
        first_node = self.timeline.event("first GPU node")
        self.wait(lambda: self.diffusion_replicas() > 0, SCALE_UP_TIMEOUT_S, "a Diffusion replica")
        first_replica = self.timeline.event("first Diffusion replica running")
        final = self.wait_jobs(ids)
        done = self.timeline.event("burst done")
        peak = max((s["spot"] for s in self.timeline.samples if s["t"] >= start), default=0)
        return {
            "jobs": final,
            "scale_from_zero_s": round(first_replica - start, 2),
            "first_node_s": round(first_node - start, 2),
            "burst_s": round(done - start, 2),
            "peak_spot_nodes": peak,
        }

    def idle(self) -> dict[str, Any]:
        """(b) After the last job, Diffusion replicas and GPU nodes go back to zero."""
        last_job = self.timeline.now()
        self.wait(lambda: self.diffusion_replicas() == 0, self.idle_timeout_s + 60,
                  "Diffusion at 0 replicas")  # fmt: skip
        replicas_gone = self.timeline.event("Diffusion at 0 replicas")

        def no_gpu_node() -> bool:
            return sum(self.gpu_nodes().values()) == 0

        overdue_at = last_job + self.idle_timeout_s + 30  # the bound (b) must meet
        held = None
        try:
            self.wait(no_gpu_node, max(1.0, overdue_at - self.timeline.now()), "no GPU node")
        except TimeoutError:  # say what keeps a node busy, then see how late it goes
            held = self.objects_held()
            self.timeline.event("GPU node overdue", state=self.state())
            try:
                self.wait(no_gpu_node, 60, "no GPU node")
            except TimeoutError as error:
                raise TimeoutError(f"{error}\nobjects held when overdue:\n{held}") from None
        nodes_gone = self.timeline.event("last GPU node gone")
        return {
            "replicas_to_zero_s": round(replicas_gone - last_job, 2),
            "nodes_to_zero_s": round(nodes_gone - last_job, 2),
            "objects_held_when_overdue": held,
        }

    def objects_held(self) -> str:
        """Ray's `ray memory` table of the cluster: every object ref, which process holds it,
        why, and where it was made (a node holding an object in its store is not idle)."""
        from ray._private.internal_api import memory_summary
        from ray.autoscaler.v2.sdk import get_cluster_status

        try:  # the autoscaler's own words for why a node is not idle
            status = get_cluster_status(self.cluster.address)
            activity = "\n".join(
                f"{node.ray_node_type_name} {node.node_id}: {node.node_activity}"
                for node in status.active_nodes
            )
        except Exception as error:  # a diagnosis only: never the failure itself
            activity = f"(cluster status unavailable: {error})"
        try:
            table = memory_summary(self.cluster.address, line_wrap=False, num_entries=20)
        except Exception as error:
            table = f"(memory summary unavailable: {error})"
        return f"node activity:\n{activity}\n{table}"

    def fault(self, kind: str, jobs: int = 4, drain_deadline_s: float = 60.0) -> dict[str, Any]:
        """(c) kind="kill": a spot node hard-killed mid-job; (d) kind="drain": a spot node
        drained with a preemption notice mid-job. Returns the jobs' final statuses."""
        ids = self.submit(jobs)
        self.timeline.event(f"{kind}: jobs submitted", jobs=jobs)
        self.wait(lambda: self.diffusion_replicas() > 0, SCALE_UP_TIMEOUT_S, "a Diffusion replica")
        self.wait_mid_job(ids)
        victim = self.busiest_spot_node()
        if kind == "kill":
            processes = self.cluster.kill_node(victim)
            self.timeline.event("spot node killed", node=victim[-5:], processes=processes)
        else:
            self.cluster.drain_node(victim, drain_deadline_s)
            self.timeline.event("spot node drained", node=victim[-5:], deadline_s=drain_deadline_s)
        final = self.wait_jobs(ids)
        self.timeline.event(f"{kind}: jobs ended")
        if kind == "drain":  # the notice's deadline: the machine goes (if it is still there)
            if any(n.node_id == victim for n in self.cluster.alive()):
                self.cluster.kill_node(victim)
                self.timeline.event("drained node reclaimed", node=victim[-5:])
        return {"jobs": final, "node": victim}

    def fallback(self, jobs: int = 2) -> dict[str, Any]:
        """(e) The spot group without capacity (max 0): the on-demand group takes the work."""
        self.cluster.set_max_workers("gpu-spot", 0)
        self.timeline.event("spot capacity gone (max 0)")
        start = self.timeline.now()
        ids = self.submit(jobs)
        self.wait(lambda: self.gpu_nodes()["gpu-ondemand"] > 0, SCALE_UP_TIMEOUT_S,
                  "an on-demand node")  # fmt: skip
        self.timeline.event("on-demand node up")
        final = self.wait_jobs(ids)
        self.timeline.event("fallback jobs done")
        spot_used = max((s["spot"] for s in self.timeline.samples if s["t"] >= start), default=0)
        return {"jobs": final, "spot_nodes_during": spot_used}


DIFFUSION_TITLE = f"ServeReplica:{APP}:Diffusion"  # Ray's process title of a replica's worker


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _cpu_ticks(pid: int) -> int:
    """User + system CPU ticks of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def job_summary(final: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the faults must not change: every job done in its first attempt, each chunk
    billed once (counted work units == predicted), and the retries the orchestrator made."""
    lost = [job_id for job_id, s in final.items() if s["state"] != "done"]
    reports = [s["report"] for s in final.values() if s.get("report")]
    attempts = [r.get("attempts", 1) for r in reports]
    billed_once = all(r["plan"]["work_units"] == r["plan"]["predicted_work_units"] for r in reports)
    # A checkpointed chunk run again would leave a second set of records for its chunk (the
    # ledger takes a chunk's records once, when it is checkpointed).
    recomputed = 0
    for status in final.values():
        seen: dict[tuple[str, int], int] = {}
        for record in status.get("ledger", []):
            if record.get("chunk") is not None:
                key = (record["stage"], record["chunk"])
                seen[key] = seen.get(key, 0) + 1
        recomputed += sum(1 for count in seen.values() if count > 1)
    return {
        "jobs": len(final),
        "lost": len(lost),
        "lost_ids": lost,
        "errors": [final[j].get("error") for j in lost],
        "max_attempts": max(attempts, default=0),
        "chunk_retries": sum(r.get("chunk_retries", 0) for r in reports),
        "billed_once": billed_once,
        "chunks_recomputed": recomputed,
    }
