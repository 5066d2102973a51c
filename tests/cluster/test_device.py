"""Device selection: train.device cuda where torch.cuda.is_available() is False.

The workflow cannot reject cuda when it builds the job graph, because a cluster
submission builds it on a login node without GPUs. The training job raises
instead, and these tests check that its message reaches the user at the first
training job.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from lora_expressivity.config import ConfigError  # noqa: E402
from lora_expressivity.devices import resolve_device  # noqa: E402

GRID = Path(__file__).resolve().with_name("grid.yaml")
NO_GPU_MESSAGE = "device 'cuda' was requested but PyTorch sees no CUDA GPU"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_gpu_raises(no_gpu):
    with pytest.raises(ConfigError, match=NO_GPU_MESSAGE) as raised:
        resolve_device("cuda")
    assert "use device 'auto' or 'cpu'" in str(raised.value)


def test_auto_without_gpu_uses_cpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")


def test_unknown_device_raises():
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="PyTorch sees a GPU here, so device cuda works")
def test_workflow_cuda_fails_first_training_job(tmp_path):
    overlay = tmp_path / "cuda.yaml"
    overlay.write_text("train:\n  device: cuda\n")
    workdir = tmp_path / "work"
    command = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(GRID), str(overlay),
        "--cores", "1",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr

    assert completed.returncode != 0, output
    assert NO_GPU_MESSAGE in output
    # Without --keep-going, Snakemake stops after the first failed training job.
    assert output.count("Error in rule train_") == 1, output
    assert not list((workdir / "results" / "runs").glob("*.json"))
    training_logs = list((workdir / "logs" / "train").glob("*.log"))
    assert len(training_logs) == 1
    assert NO_GPU_MESSAGE in training_logs[0].read_text()
