"""TrainSpec: validated at construction, JSON round trip, unknown fields rejected."""

from __future__ import annotations

import json

import pytest

from trainer.spec import Elastic, Resources, SpecError, Storage, TrainSpec


def test_defaults_are_valid_and_round_trip_through_json() -> None:
    spec = TrainSpec(global_batch_size=48, elastic=Elastic(1, 3), resources=Resources(gpus=2), storage=Storage(pvc_claim="runs"))
    back = TrainSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert TrainSpec.from_dict(TrainSpec().to_dict()) == TrainSpec()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"global_batch_size": 63}, "not divisible by the world size 2"),
        ({"num_nodes": 3}, "not divisible by the world size 6"),
        ({"resources": {"gpus": -1}}, "resources.gpus must be an integer >= 0"),
        ({"resources": {"gpus": 1}}, "nproc_per_node 2 exceeds resources.gpus 1"),
        ({"resources": {"gpus": 2}, "device": "cpu"}, "GPUs would sit idle"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"max_restarts": -1}, "max_restarts must be an integer >= 0"),
        ({"checkpoint_every_steps": 0}, "checkpoint_every_steps must be an integer >= 1"),
        ({"ttl_seconds_after_finished": -5}, "ttl_seconds_after_finished must be a whole number"),
        ({"active_deadline_seconds": 0}, "active_deadline_seconds must be a whole number"),
        ({"config": [1]}, "config must be a mapping"),
        ({"command": "python x.py"}, "command must be a non-empty list of strings"),
        ({"code": {"path": "rel", "sha256": "0" * 64}}, "code.path must be absolute"),
        ({"code": {"path": "/x", "sha256": "abc"}}, "is not a sha256"),
        ({"device": "tpu"}, "device must be one of"),
        ({"clean_pod_policy": "Sometimes"}, "clean_pod_policy must be one of"),
        ({"model_name": "Digits!"}, "model_name"),
        ({"elastic": {"min_replicas": 2, "max_replicas": 4}, "num_nodes": 1}, "must lie in elastic [2, 4]"),
        ({"elastic": {"min_replicas": 1, "max_replicas": 3}, "global_batch_size": 8}, "not divisible by the world size 6"),
    ],
)
def test_invalid_specs_are_rejected_at_construction(changes: dict, message: str) -> None:
    with pytest.raises(SpecError) as e:
        TrainSpec.from_dict(changes)
    assert message in str(e.value)


def test_nested_validation() -> None:
    with pytest.raises(SpecError, match="max_replicas"):
        Elastic(min_replicas=3, max_replicas=2)
    with pytest.raises(SpecError, match="Kubernetes quantity"):
        Resources(memory="lots")


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(SpecError, match="unknown fields \\['epoch'\\]"):
        TrainSpec.from_dict({"epoch": 3})
    with pytest.raises(SpecError, match="resources: unknown fields \\['gpu'\\]"):
        TrainSpec.from_dict({"resources": {"gpu": 1}})


def test_specs_saved_before_tasks_read_as_the_digits_task() -> None:
    old = {"arch": "digits_cnn", "lr": 0.1, "momentum": 0.5, "shuffle_labels": True, "epochs": 2}
    spec = TrainSpec.from_dict(old)
    assert (spec.task, spec.config, spec.epochs) == ("digits", {"lr": 0.1, "momentum": 0.5, "shuffle_labels": True}, 2)
    with pytest.raises(SpecError, match="specs name a task now"):
        TrainSpec.from_dict({"arch": "resnet"})


def test_task_config_and_code_round_trip() -> None:
    spec = TrainSpec(task="mypkg.task:Churn", config={"lr": 0.01, "layers": [2, 3]},
                     command=("python", "train.py"))
    back = TrainSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.command == ("python", "train.py")
