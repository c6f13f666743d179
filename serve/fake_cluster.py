"""A Ray cluster on one machine with Ray's real autoscaler (v2) on its fake multi-node provider.

What the cluster test (tests/cluster/) and `benchmarks/autoscale.py` run the app on: a CPU head
(ingress and CPU stages), a spot GPU group and an on-demand GPU fallback group, as in
cluster/*.yaml and the Helm chart, with logical GPUs. The autoscaler launches "nodes" as extra
raylets on this machine (`FakeMultiNodeProvider`), so scale-up from zero, idle scale-down,
priorities and preemption are Ray's own code paths, only the machines are fake.

Why not `ray.cluster_utils.AutoscalingCluster`: its start and stop run `ray stop --force`,
which kills every Ray process on the machine (other tests, other users). This module starts a
head of its own instead, in a session of its own (`start_new_session`; nothing Ray starts
calls setsid, see serve/process_group.py), with its own temp dir and ports, and at the end
kills that session only. The wheel lacks the provider's `example.yaml` (autoscaler v2 then
fails silently, the error only in monitor.err), so the full config is written here and the
provider named by its class.

A node is hard-killed (`kill_node`: SIGKILL to every process started with its node id, as a
spot reclaim without notice) or drained first (`drain_node`: the GCS drain request with reason
PREEMPTION and a deadline, what KubeRay's and the cloud's preemption notices turn into).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serve.process_group import kill_session, session_members

# The fake provider numbers nodes fff...f00000 (head), fff...f00001, ... and starts each raylet
# with this variable set to its node id; the workers the raylet starts inherit it.
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
NODE_ID_VARIABLE = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"
HEAD_TYPE = "ray.head.default"  # the provider's fixed name for the head's node type
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
CAPACITY_LABEL = "motionserve.io/capacity"  # spot | on-demand (ray.io/ labels are reserved)
START_TIMEOUT_S = 180.0


@dataclass
class NodeType:
    """One worker group: resources of each node, its bounds, priority and idle timeout."""

    resources: dict[str, float]
    min_workers: int = 0
    max_workers: int = 1
    priority: int = 0
    idle_timeout_s: float | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "resources": self.resources,
            "node_config": {},
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "priority": self.priority,
            "labels": self.labels,
        }
        if self.idle_timeout_s is not None:
            entry["idle_timeout_s"] = self.idle_timeout_s
        return entry


def gpu_node_types(spot_max: int = 3, ondemand_max: int = 1,
                   idle_timeout_s: float = 10.0) -> dict[str, NodeType]:  # fmt: skip
    """cluster/aws.yaml's GPU groups, small: `gpu-spot` (preferred: higher priority) and
    `gpu-ondemand`, both from zero, one logical GPU each; custom resources `spot` /
    `on-demand` and the capacity label say which group a node (and a replica) is on."""
    object_store = 100 * 1024 * 1024
    return {
        "gpu-spot": NodeType(
            resources={"CPU": 1, "GPU": 1, "spot": 1, "object_store_memory": object_store},
            max_workers=spot_max,
            priority=10,
            idle_timeout_s=idle_timeout_s,
            labels={CAPACITY_LABEL: "spot"},
        ),
        "gpu-ondemand": NodeType(
            resources={"CPU": 1, "GPU": 1, "on-demand": 1, "object_store_memory": object_store},
            max_workers=ondemand_max,
            priority=0,
            idle_timeout_s=idle_timeout_s,
            labels={CAPACITY_LABEL: "on-demand"},
        ),
    }


@dataclass
class Node:
    """A node as the GCS sees it."""

    node_id: str
    node_type: str
    alive: bool
    resources: dict[str, float]
    labels: dict[str, str]


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out (its ephemeral range, above Ray's worker ports 10002-19999)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class FakeCluster:
    """The head (in a session of its own) and the autoscaler's config; see the module doc."""

    def __init__(self, root: Path, node_types: dict[str, NodeType], *, head_cpus: float = 4,
                 head_object_store: int = 200 * 1024 * 1024,
                 env: dict[str, str] | None = None):  # fmt: skip
        # Unix socket paths under the temp dir must stay short (108 bytes): callers pass a
        # short root (e.g. under /tmp).
        self.root = root
        self.temp_dir = root / "ray"
        self.config_path = root / "autoscaling.yaml"
        self.node_types = dict(node_types)
        self.head_cpus = head_cpus
        self.head_object_store = head_object_store
        self.env = env or {}
        self.session_id: int | None = None
        self.gcs_port, self.client_port, *self._ports = _free_ports(9)
        self._gcs = None

    @property
    def address(self) -> str:
        import ray._private.services

        return f"{ray._private.services.get_node_ip_address()}:{self.gcs_port}"

    # ------------------------------------------------------------------ config

    def autoscaling_config(self) -> dict[str, Any]:
        types = {name: t.config() for name, t in self.node_types.items()}
        types[HEAD_TYPE] = {
            "resources": {"CPU": self.head_cpus},
            "node_config": {},
            "max_workers": 0,
        }
        return {
            "cluster_name": f"motionserve-fake-{self.gcs_port}",
            "max_workers": sum(t.max_workers for t in self.node_types.values()),
            "provider": {
                # The fake provider's class under type "external": under "fake_multinode" the
                # autoscaler first loads that type's defaults from the example.yaml the wheel
                # lacks, and fails.
                "type": "external",
                "module": FAKE_PROVIDER,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "launch_multiple": True,
                "head_node_id": FAKE_HEAD_NODE_ID,
                "gcs_address": self.address,
            },
            "available_node_types": types,
            "head_node_type": HEAD_TYPE,
            "auth": {},
            "upscaling_speed": 2.0,
            "idle_timeout_minutes": 0.5,
            "docker": {},
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
        }

    def write_config(self) -> None:
        """(Re)write the autoscaler's config: autoscaler v2 reads it again on every update."""
        partial = self.config_path.with_suffix(".part")
        partial.write_text(yaml.safe_dump(self.autoscaling_config()))
        partial.replace(self.config_path)

    def set_max_workers(self, node_type: str, count: int) -> None:
        """Change a group's bound at run time (0: the group cannot launch, as a spot market
        without capacity)."""
        self.node_types[node_type].max_workers = count
        self.write_config()

    # ------------------------------------------------------------------ start / stop

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        node_manager, object_manager, agent_grpc, agent_http, runtime_env, metrics, dashboard = (
            self._ports
        )
        env = {
            **os.environ,
            # One auth mode for every process: `ray start` turns token auth on by itself when
            # the variable is unset and a token file exists, which this process would not use.
            AUTH_MODE_VARIABLE: os.environ.get(AUTH_MODE_VARIABLE, "disabled"),
            **self.env,
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            NODE_ID_VARIABLE: FAKE_HEAD_NODE_ID,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's OOM killer compares the whole machine's memory with its threshold: with
            # other work on the machine it would kill the fake nodes' replicas (and the Serve
            # controller), which is no fault under test.
            "RAY_memory_monitor_refresh_ms": "0",
        }
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--head",
            f"--port={self.gcs_port}", f"--ray-client-server-port={self.client_port}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            "--include-dashboard=false", f"--dashboard-port={dashboard}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.head_cpus}", "--num-gpus=0",
            f"--object-store-memory={self.head_object_store}",
            f"--autoscaling-config={self.config_path}", "--disable-usage-stats",
        ]  # fmt: skip
        log = (self.root / "ray-start.log").open("ab")
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.session_id = process.pid
        try:
            try:
                rc = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"ray start did not return in {timeout_s} s") from None
            if rc != 0:
                raise RuntimeError(f"ray start failed ({rc}); see {self.root / 'ray-start.log'}")
            wait_for(lambda: self.nodes(), timeout_s, "the head node registered with its GCS")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        """Kill every process of the head's session (the head, the autoscaler and the nodes it
        launched, their workers): never another Ray on the machine. Returns how many."""
        if self.session_id is None:
            return 0
        self._gcs = None
        killed = kill_session(self.session_id)
        self.session_id = None
        return killed

    def processes(self) -> list[int]:
        return session_members(self.session_id) if self.session_id else []

    # ------------------------------------------------------------------ state

    @property
    def gcs(self):
        if self._gcs is None:
            import ray._raylet

            self._gcs = ray._raylet.GcsClient(address=self.address)
        return self._gcs

    def nodes(self) -> list[Node]:
        from ray.core.generated import gcs_pb2

        infos = self.gcs.get_all_node_info(timeout=10)
        nodes = []
        for node_id, info in infos.items():
            labels = dict(info.labels)
            nodes.append(Node(
                node_id=node_id.hex(),
                node_type=labels.get("ray.io/node-group")
                or (HEAD_TYPE if node_id.hex() == FAKE_HEAD_NODE_ID else "?"),
                alive=info.state == gcs_pb2.GcsNodeInfo.ALIVE,
                resources=dict(info.resources_total),
                labels=labels,
            ))  # fmt: skip
        return nodes

    def alive(self, node_type: str | None = None) -> list[Node]:
        """Alive nodes (of `node_type`: a group name, or "gpu" for both GPU groups)."""
        out = []
        for node in self.nodes():
            if not node.alive or node.node_id == FAKE_HEAD_NODE_ID:
                continue
            if node_type == "gpu" and node.resources.get("GPU", 0) <= 0:
                continue
            if node_type not in (None, "gpu") and self.group_of(node) != node_type:
                continue
            out.append(node)
        return out

    def group_of(self, node: Node) -> str:
        """The worker group of a node, from its custom resources (which mirror the groups)."""
        for name, node_type in self.node_types.items():
            extra = set(node_type.resources) - {"CPU", "GPU", "object_store_memory", "memory"}
            if extra and all(node.resources.get(r, 0) > 0 for r in extra):
                return name
        return HEAD_TYPE if node.node_id == FAKE_HEAD_NODE_ID else "?"

    # ------------------------------------------------------------------ faults

    def node_pids(self, node_id: str) -> list[int]:
        """Processes of our session started for `node_id` (its raylet, agents and workers)."""
        marker = f"{NODE_ID_VARIABLE}={node_id}".encode()
        pids = []
        for pid in self.processes():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:  # exited meanwhile, or not ours to read
                continue
            if marker in environ.split(b"\0"):
                pids.append(pid)
        return pids

    def kill_node(self, node_id: str) -> int:
        """A spot reclaim without notice: SIGKILL every process of the node at once."""
        if node_id == FAKE_HEAD_NODE_ID:
            raise ValueError("the head is not a spot node")
        pids = self.node_pids(node_id)
        if not pids:
            raise RuntimeError(f"no process of node {node_id} found")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def drain_node(self, node_id: str, deadline_s: float, message: str = "spot preemption"):
        """A preemption notice: the GCS drains the node (Serve moves its replicas away, the
        scheduler places nothing new there) until `deadline_s` from now."""
        from ray.core.generated import autoscaler_pb2

        deadline_ms = int(time.time() * 1000 + deadline_s * 1000)
        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        accepted, why = self.gcs.drain_node(node_id, reason, message, deadline_ms)
        if not accepted:
            raise RuntimeError(f"drain of node {node_id} refused: {why}")

    def log_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def describe(self) -> str:
        """One line per node, for failure messages."""
        return json.dumps(
            [
                {"id": n.node_id[-5:], "group": self.group_of(n), "alive": n.alive}
                for n in self.nodes()
            ]
        )


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str,
             poll_s: float = 0.25) -> Any:  # fmt: skip
    """Poll `condition` until it returns something truthy; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # the GCS may not answer yet
            last_error = error
        time.sleep(poll_s)
    detail = f" (last error: {last_error})" if last_error else ""
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{detail}")
