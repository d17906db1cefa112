"""Every rollout policy setting is spelled once (``deploy.rollout.KNOBS``) and appears on every
surface: the persisted document, the command line and the Rollout custom resource's schema."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from deploy.cli import build_parser
from deploy.cluster.cr_store import policy_from_spec, policy_to_spec
from deploy.rollout import KNOBS, AnalysisPolicy, GatePolicy, MetricThreshold, RolloutPolicy
from tests.support.paths import REPO

CRD = REPO / "deploy" / "k8s" / "crds" / "kloop.dev_rollouts.yaml"


def _leaf_fields() -> set[tuple[str, str]]:
    top = {("rollout", f.name) for f in dataclasses.fields(RolloutPolicy)
           if f.name not in ("analysis", "gate")}
    return (top | {("analysis", f.name) for f in dataclasses.fields(AnalysisPolicy)}
            | {("gate", f.name) for f in dataclasses.fields(GatePolicy)})


def test_the_table_names_every_field_of_the_nested_policies_once() -> None:
    placed = [(k.section, k.field) for k in KNOBS]
    assert len(placed) == len(set(placed)) and set(placed) == _leaf_fields()
    assert len({k.name for k in KNOBS}) == len(KNOBS)
    assert len({k.flag for k in KNOBS}) == len({k.cr_key for k in KNOBS}) == len(KNOBS)


def test_the_crd_schema_declares_exactly_the_tables_keys() -> None:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(spec["properties"]["policy"]["properties"]) == (
        {k.cr_key for k in KNOBS} | {a for k in KNOBS for a in k.alias_cr_keys})


def test_every_setting_is_a_flag_that_reaches_the_policy() -> None:
    from deploy.cli import common

    changed = RolloutPolicy(steps=(5, 100), step_timeout_s=100, failure_limit=3, error_limit=7,
                            retire_after_s=1, ready_timeout_s=9,
                            analysis=AnalysisPolicy(1, 2, 0.5, 2, 0.1, 3, 9),
                            gate=GatePolicy(metric="f1", tolerance=0.2, threshold=0.5,
                                            conditions=(MetricThreshold("rmse", tolerance=1),)))
    argv = ["rollout", "m", "--candidate", "2"]
    for knob in KNOBS:
        value = knob.get(changed)
        if knob.repeated:
            argv += [x for c in value for x in (knob.flag, str(c))]
            continue
        argv += [knob.flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    args = build_parser().parse_args(argv)
    assert common.policy(args) == changed
    assert common.policy(build_parser().parse_args(argv[:4])) == RolloutPolicy()  # defaults


def test_cr_keys_round_trip_and_unknown_keys_are_refused() -> None:
    p = RolloutPolicy.from_dict({"min_requests": 7, "gate_metric": "f1", "steps": [20, 100]})
    spec = policy_to_spec(p)
    assert spec == {"minRequests": 7, "gateMetric": "f1", "steps": [20, 100]}
    assert policy_from_spec(spec) == p
    with pytest.raises(ValueError, match="unknown policy field"):
        policy_from_spec({"minRequest": 7})


def test_the_persisted_document_is_flat_and_round_trips() -> None:
    doc = RolloutPolicy().to_dict()
    assert set(doc) == {k.name for k in KNOBS}
    assert not any(isinstance(v, dict) for v in doc.values())
    assert RolloutPolicy.from_dict(doc) == RolloutPolicy()


def test_gate_conditions_are_a_list_of_camel_case_objects_in_the_cr() -> None:
    p = RolloutPolicy(gate=GatePolicy(conditions=(
        MetricThreshold("f1", threshold=0.8, min_relative_change=0.01),)))
    spec = policy_to_spec(p)
    assert spec == {"gateConditions": [{"metric": "f1", "threshold": 0.8,
                                        "minRelativeChange": 0.01}]}
    assert policy_from_spec(spec) == p
    assert RolloutPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown fields"):
        policy_from_spec({"gateConditions": [{"metric": "f1", "floor": 0.8}]})
    with pytest.raises(ValueError, match="sets no limit"):
        policy_from_spec({"gateConditions": [{"metric": "f1"}]})


@pytest.mark.parametrize("old, new", [
    ({"max_accuracy_drop": 0.02, "min_accuracy": 0.6, "gate_metric": "accuracy"},
     GatePolicy(metric="accuracy", tolerance=0.02, threshold=0.6)),
    ({"max_accuracy_drop": 0.01, "min_accuracy": None}, GatePolicy()),
])
def test_records_saved_with_the_former_gate_keys_still_read(old, new) -> None:
    assert RolloutPolicy.from_dict(old).gate == new
    cr = {("maxAccuracyDrop" if k == "max_accuracy_drop" else
           "minAccuracy" if k == "min_accuracy" else "gateMetric"): v
          for k, v in old.items() if v is not None}
    assert policy_from_spec(cr).gate == new
    with pytest.raises(ValueError, match="given twice"):
        RolloutPolicy.from_dict({"max_accuracy_drop": 0.02, "gate_tolerance": 0.03})
