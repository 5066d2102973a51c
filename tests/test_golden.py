"""The reference's printed values for small configurations, reproduced by the package and the CLI."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from lora_expressivity import RunConfig, run
from lora_expressivity.cli import FLAGS

CASES = json.loads((ROOT / "tests" / "data" / "golden-cases.json").read_text())["cases"]


def config_of(case) -> RunConfig:
    flags = dict(case["flags"])
    flags.pop("wandb")
    return RunConfig(**flags)


def check_loss(name, actual, expected, tolerance):
    if "loss_rel" in tolerance:
        assert actual == pytest.approx(expected, rel=tolerance["loss_rel"]), name
    else:
        allowed = tolerance["test_loss_abs"] + tolerance["test_loss_rel"] * abs(expected)
        assert abs(actual - expected) <= allowed, name


def check_metrics(case, metrics: dict, warnings: str):
    """Compare a run's metrics (RunResult fields) with the reference's values at the case's tolerance."""
    expected, tolerance = case["expected"], case["tolerance"]
    if isinstance(tolerance.get("test_loss"), str):
        # Tied singular values: the SVD basis, hence the loss, depends on the LAPACK build.
        assert 0 < metrics["test_loss"] < 0.1
    else:
        check_loss(case["name"], metrics["test_loss"], expected["test_loss"], tolerance)
    for key in ("val_loss", "final_train_loss"):
        if key in expected:
            assert metrics[key] == pytest.approx(expected[key], rel=tolerance["loss_rel"])
    if "pretraining_stopped_at_epoch" in expected:
        assert metrics["pretraining_stopped_at_epoch"] == expected["pretraining_stopped_at_epoch"]
    if "singular_values" in expected:
        assert len(metrics["singular_values"]) == len(expected["singular_values"])
        for actual, reference in zip(metrics["singular_values"], expected["singular_values"]):
            assert actual == pytest.approx(reference, rel=tolerance["singular_values_rel"])
    if expected.get("printed_warning"):
        assert "misses its target" in warnings


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_golden_case(case, caplog):
    result = run(config_of(case))
    check_metrics(case, result.to_dict(), caplog.text)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_golden_case_cli(case, tmp_path):
    output = tmp_path / "result.json"
    argv = [sys.executable, str(ROOT / "scripts" / "run_exp.py"), "--output", str(output)]
    for name, value in case["flags"].items():
        argv += [f"--{name}", str(value)]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True,
                               env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    expected = case["expected"]

    lines = completed.stdout.splitlines()
    assert lines[0] == "Experiment Setting:"
    # Values pass through the flag's type, as in the reference: --weight_decay 0 prints 0.0.
    types = {name: kind for name, kind, *_ in FLAGS}
    assert lines[1:27] == [f"| {name}: {types[name](value)}" for name, value in case["flags"].items()]
    assert f"Test loss: {expected['test_loss']:.4f}" in lines
    if "val_loss" in expected:
        assert f"Validation loss: {expected['val_loss']:.4f}" in lines
    if "pretraining_stopped_at_epoch" in expected:
        assert f"Pretraining finished at epoch {expected['pretraining_stopped_at_epoch']}." in lines
    assert sum(line.startswith("Singular values: tensor([") for line in lines) == len(
        expected.get("singular_values", []))

    record = json.loads(output.read_text())
    assert record["schema_version"] == 1
    assert record["config"]["seed"] == case["flags"]["seed"]
    check_metrics(case, record["metrics"], completed.stderr)
