"""Spot autoscaling with Ray's real autoscaler (v2) on its fake multi-node provider: one cluster
for the module (serve/fake_cluster.py, its own head, temp dir and ports, only its own processes
ended), the app from a config derived from serve/configs/scale.yaml (serve/autoscale_scenario.py).

The phases run in order on the same cluster, each bounded by the scenario's deadlines (every
wait fails with what it waited for and the nodes it saw):

(a) a burst takes the spot group from 0 nodes up; every job completes;
(c) a spot node hard-killed mid-job: every job completes in its first attempt, each chunk
    billed once, the lost chunk calls retried (ActorUnavailableError is transient);
(d) a spot node drained with a preemption notice mid-job: zero failed chunk calls;
(b) after the last job, Diffusion replicas and GPU nodes are back at 0 within idle_timeout + 30 s;
(e) the spot group without capacity: the on-demand group takes the work.

Opt-in: MOTIONSERVE_CLUSTER_TEST=1 (see the skip reason below).
"""

from __future__ import annotations

import os

import pytest

from serve.autoscale_scenario import Scenario, job_summary

# Not in the default collection yet: (b) missed its bound in 2 of about 8 runs (a spot node kept
# a 118 KB object in its store after the last job; README, the autoscale section), and a flaky
# test cannot gate `make test`. 161 s here at load 15 (2 Dec), well within the suite's budget.
pytestmark = pytest.mark.skipif(
    os.environ.get("MOTIONSERVE_CLUSTER_TEST") != "1",
    reason="cluster test (fake multi-node autoscaler): its scale-to-zero phase is not yet "
    "reliable (a spot node kept an object after the last job); set MOTIONSERVE_CLUSTER_TEST=1",
)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    # A short root: Ray's unix sockets live under it (108-byte path limit).
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="msc-", dir="/tmp"))
    run = Scenario(root)
    try:
        run.start()
        yield run
    finally:
        run.stop()
        assert not run.cluster.processes(), "processes of the test's cluster survived its stop"


@pytest.fixture(scope="module")
def results() -> dict:
    return {}


def test_a_burst_scales_the_spot_group_up_from_zero(scenario, results):
    burst = scenario.burst(jobs=3)
    summary = job_summary(burst["jobs"])
    assert summary["lost"] == 0, summary
    assert burst["peak_spot_nodes"] >= 1
    assert scenario.timeline.samples[0]["spot"] == 0  # it started from zero
    results["burst"] = burst


def test_a_hard_killed_spot_node_loses_no_job(scenario):
    fault = scenario.fault("kill", jobs=3)
    summary = job_summary(fault["jobs"])
    assert summary["lost"] == 0, summary
    assert summary["max_attempts"] == 1, summary  # the same attempt: no resume
    assert summary["billed_once"] and summary["chunks_recomputed"] == 0, summary
    assert summary["chunk_retries"] > 0, summary  # the node had chunks in flight


def test_a_drained_spot_node_fails_no_call(scenario):
    fault = scenario.fault("drain", jobs=2)
    summary = job_summary(fault["jobs"])
    assert summary["lost"] == 0, summary
    assert summary["chunk_retries"] == 0, summary
    assert summary["billed_once"] and summary["chunks_recomputed"] == 0, summary


def test_idle_gpu_nodes_go_back_to_zero(scenario):
    idle = scenario.idle()
    assert idle["nodes_to_zero_s"] <= scenario.idle_timeout_s + 30, idle


def test_without_spot_capacity_on_demand_takes_the_work(scenario):
    fallback = scenario.fallback(jobs=1)
    summary = job_summary(fallback["jobs"])
    assert summary["lost"] == 0, summary
    assert fallback["spot_nodes_during"] == 0
