"""The local gate refuses, in one line and before Ray waits, what no node of a local instance can
host: GPUs per worker and in all, accelerator types, labels, and workers that fit only when
split across nodes. Built from node lists: no Ray Train run."""

from __future__ import annotations

import pytest

from hdd_ray.placement import ResourceGate, label_matches

ONE_GPU_NODE = {"resources": {"CPU": 8.0, "GPU": 1.0}, "labels": {"gpu": "L4"}}
TWO_NODES = ResourceGate([ONE_GPU_NODE, {"resources": {"CPU": 8.0, "GPU": 1.0},
                                         "labels": {"gpu": "L4"}}])


def _req(**kw):
    return {"num_workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0, "custom": {},
            "accelerator_type": None, "label_selector": {}, **kw}


def _one_line(reason: str) -> str:
    assert reason and "\n" not in reason
    return reason


def test_two_gpus_per_worker_over_two_one_gpu_nodes_is_refused():
    reason = _one_line(TWO_NODES.unfit(_req(gpus_per_worker=2)))
    assert reason.startswith("asks for 2 GPU per worker but no node of the local Ray instance "
                             "has more than 1: lower experts.resources per worker")
    assert TWO_NODES.capacity["GPU"] == 2.0  # the total alone would have let it through


def test_one_gpu_workers_spread_over_one_gpu_nodes_fit():
    assert TWO_NODES.unfit(_req(num_workers=2, gpus_per_worker=1)) == ""
    reason = _one_line(TWO_NODES.unfit(_req(num_workers=3, gpus_per_worker=1)))
    assert reason.startswith("asks for 3 GPU in all (3 workers) but the local Ray instance has 2")


def test_workers_that_fit_the_totals_but_not_the_nodes_are_refused():
    gate = ResourceGate([{"resources": {"CPU": 4.0, "GPU": 1.0}},
                         {"resources": {"CPU": 1.0, "GPU": 1.0}}])
    # 2 x (2 CPU + 1 GPU) = 4 CPU + 2 GPU <= totals (5, 2), but the second node has 1 CPU
    reason = _one_line(gate.unfit(_req(num_workers=2, cpus_per_worker=2, gpus_per_worker=1),
                                  "router.resources"))
    assert "can hold only 1 (each worker must fit on one node)" in reason
    assert "router.resources.num_workers" in reason


def test_labels_no_node_carries_are_refused_and_selectors_follow_ray():
    reason = _one_line(TWO_NODES.unfit(_req(label_selector={"gpu": "H100"})))
    assert reason.startswith("asks for nodes labelled {'gpu': 'H100'} "
                             "(experts.resources.label_selector) but no node")
    assert TWO_NODES.unfit(_req(label_selector={"gpu": "in(H100, L4)"})) == ""
    assert label_matches({"gpu": "L4"}, {"gpu": "!H100"})
    assert not label_matches({"gpu": "L4"}, {"gpu": "!in(L4,A10G)"})
    assert label_matches({}, {"zone": "!us-east1"})  # absent counts as "not equal"
    # the label narrows the nodes the other checks consider
    gate = ResourceGate([{"resources": {"CPU": 8.0, "GPU": 4.0}, "labels": {"gpu": "L4"}},
                         {"resources": {"CPU": 8.0, "GPU": 1.0}, "labels": {"gpu": "H100"}}])
    reason = _one_line(gate.unfit(_req(gpus_per_worker=2, label_selector={"gpu": "H100"})))
    assert reason.startswith("asks for 2 GPU per worker but no node")


def test_an_accelerator_no_node_has_is_refused():
    gate = ResourceGate([{"resources": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:L4": 1.0}}])
    assert gate.unfit(_req(gpus_per_worker=1, accelerator_type="L4")) == ""
    reason = _one_line(gate.unfit(_req(gpus_per_worker=1, accelerator_type="H100"),
                                  "evaluation.resources"))
    assert reason.startswith("asks for accelerator_type H100 but the local Ray instance has no "
                             "such accelerator: drop evaluation.resources.accelerator_type")


def test_a_request_for_nothing_fits_anywhere():
    assert ResourceGate({"CPU": 1.0}).unfit(_req(cpus_per_worker=0)) == ""


def test_the_local_gate_reads_the_instance_and_evaluation_is_refused_before_it_waits(
        ray_local, tmp_path):
    from hdd_ray.config import load_config
    from hdd_ray.errors import CampaignError
    from hdd_ray.evaluation.remote import evaluate_on_ray, task_options
    from hdd_ray.placement import local_gate

    gate = local_gate(None)
    assert gate is not None and gate.capacity["CPU"] == 2.0
    assert all("ray.io/node-id" in node["labels"] for node in gate.nodes)
    assert local_gate("ray://elsewhere:10001") is None  # a cluster grows: no gate there
    cfg = load_config(overrides=[f"root={tmp_path}", "evaluation.resources.num_gpus=1",
                                 "evaluation.resources.accelerator_type=A100"])
    assert task_options(cfg) == {"num_cpus": 1.0, "num_gpus": 1.0, "max_retries": 0,
                                 "accelerator_type": "A100"}
    with pytest.raises(CampaignError, match=r"^evaluation asks for accelerator_type A100"):
        evaluate_on_ray(cfg, [])
