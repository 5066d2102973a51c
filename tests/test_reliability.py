"""The workflow under faults: killed jobs, diverging runs, corrupt or foreign result files, tied singular values.

The workflow tests run the real Snakefile on a small grid in temporary folders. The
grid's sgd batch trains long enough (a few seconds) to be killed in the middle, and
its learning rate of 1e30 makes half of its runs diverge.
"""

import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lora_expressivity.config import RunConfig  # noqa: E402
from lora_expressivity.experiment import run  # noqa: E402
from lora_expressivity.grid import expand_grid  # noqa: E402

pytestmark = pytest.mark.slow

DIVERGING_LR = 1.0e30
GRID = {
    "shared": {"width": 4, "batch_size": 16, "n_epochs": 3000, "n_test": 100, "pretrained_epochs": 10},
    "seeds": [0],
    "sweep": {"lr": [0.01, DIVERGING_LR], "weight_decay": [0]},
    "experiments": {
        "linear": {"exp": "fnn", "activation": "linear", "use_bias": 0, "depths": [[1, 2]], "pretrained": [0],
                   "rank": [1, 2], "methods": {"ours": {}, "sgd": {}}},
        # Every run of this cell diverges, so the rank-step table has a row without statistics.
        "steps": {"exp": "fnn", "activation": "relu", "use_bias": 1, "depths": [[2, 4]], "pretrained": [0],
                  "rank": 1, "methods": {"sgd": {"lr": DIVERGING_LR, "rank_step": [1]}}},
    },
    "figures": ["figure1", "rank_steps"],
    # Methods train in separate jobs here, so that the kill test can find the sgd job.
    "batching": {"batch_over": ["rank", "lr", "weight_decay", "tune_bias", "last_layers", "rank_step"]},
    "train": {"device": "cpu", "threads": 1},
}
# Metrics that differ between two runs of the same configuration.
TIMING_METRICS = {"wall_time_s"}


@pytest.fixture(scope="module")
def snakefile(tmp_path_factory) -> Path:
    """A copy of the workflow's code, so that edits in the repository during the tests change no run."""
    copy = tmp_path_factory.mktemp("workflow")
    for name in ("Snakefile", "rules", "scripts", "src", "config", "report", "envs"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, copy / name)
    return copy / "Snakefile"


def start_snakemake(snakefile: Path, workdir: Path) -> subprocess.Popen:
    (workdir / "config.yaml").write_text(yaml.safe_dump(GRID))
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--configfile", "config.yaml",
               "--cores", "2"]
    return subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run_snakemake(snakefile: Path, workdir: Path) -> str:
    process = start_snakemake(snakefile, workdir)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def strict_json(path: Path) -> dict:
    """Parse a file as JSON, rejecting NaN and Infinity, which are not JSON."""
    def reject(constant):
        raise ValueError(f"{path} contains {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def grid_run_ids(workdir: Path) -> set[str]:
    with open(workdir / "results" / "configs" / "runs.tsv") as stream:
        return {row["run_id"] for row in csv.DictReader(stream, delimiter="\t")}


def read_csv(path: Path) -> list[dict]:
    with open(path) as stream:
        return list(csv.DictReader(stream))


def comparable(record: dict) -> dict:
    """The parts of a result record that a rerun of the same configuration must reproduce."""
    metrics = {key: value for key, value in record["metrics"].items() if key not in TIMING_METRICS}
    return {"config": record["config"], "config_hash": record["config_hash"], "metrics": metrics}


@pytest.fixture(scope="module")
def finished(snakefile, tmp_path_factory):
    """A folder where the small grid ran to the end without interruption."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_snakemake(snakefile, workdir)
    return workdir


# ---------------------------------------------------------------- killed training job


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of pid, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name in parentheses may contain spaces, so split after it.
        parent = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def training_process(snakemake_pid: int, log_pattern: str) -> tuple[int, Path] | None:
    """The train.py process below snakemake_pid whose open log file matches log_pattern, and that log."""
    for pid in descendants(snakemake_pid):
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not any(b"/.snakemake/scripts/" in part and part.endswith(b"train.py") for part in arguments):
                continue
            open_files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for name in open_files:
            if re.search(log_pattern, name):
                return pid, Path(name)
    return None


def kill_training_midway(process: subprocess.Popen) -> int:
    """SIGKILL the linear experiment's sgd job (4 runs) once its log reports that training started."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        found = training_process(process.pid, r"logs/train/fnn-sgd-[0-9a-f]+\.log$")
        if found is not None and "training 4 runs" in found[1].read_text():
            os.kill(found[0], signal.SIGKILL)
            return found[0]
        time.sleep(0.05)
    raise AssertionError("the sgd training job never ran; the workflow output:\n" + process.communicate()[0])


def linear_sgd_run_ids() -> set[str]:
    """Run ids of the job that the kill test interrupts."""
    return {run.run_id for run in expand_grid(GRID) if run.experiments == ("linear",) and run.config.method == "sgd"}


@pytest.fixture(scope="module")
def killed_and_rerun(snakefile, tmp_path_factory):
    """Run the grid, kill the sgd job midway, and run the grid again.

    Returns the folder, the exit status and output of the first run, the contents of
    the files in results/runs after the kill, and the output of the second run.
    """
    workdir = tmp_path_factory.mktemp("killed")
    process = start_snakemake(snakefile, workdir)
    try:
        kill_training_midway(process)
        first_output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    runs = workdir / "results" / "runs"
    after_kill = {path.name: path.read_text() for path in runs.iterdir()} if runs.is_dir() else {}
    rerun_output = run_snakemake(snakefile, workdir)
    return workdir, process.returncode, first_output, after_kill, rerun_output


def test_killed_job_fails_the_first_run(killed_and_rerun):
    _, returncode, output, _, _ = killed_and_rerun

    assert returncode != 0, output
    assert re.search(r"Error in rule train_fnn_sgd_", output), output


def test_killed_job_leaves_no_partial_json(killed_and_rerun):
    _, _, _, after_kill, _ = killed_and_rerun

    for name, text in after_kill.items():
        assert name.endswith(".json"), f"{name} is left in results/runs after the kill"
        record = json.loads(text)
        assert record["schema_version"] == 1, name
    assert not {f"{run_id}.json" for run_id in linear_sgd_run_ids()} & set(after_kill)


def test_rerun_gives_one_result_per_run(killed_and_rerun):
    workdir, _, _, _, _ = killed_and_rerun
    files = sorted((workdir / "results" / "runs").iterdir())

    assert {path.stem for path in files} == grid_run_ids(workdir)
    assert all(path.suffix == ".json" for path in files), files
    for path in files:
        assert strict_json(path)["schema_version"] == 1, path
    assert read_csv(workdir / "results" / "tables" / "skipped.csv") == []


def test_rerun_matches_uninterrupted_run(killed_and_rerun, finished):
    workdir, _, _, _, _ = killed_and_rerun

    assert grid_run_ids(workdir) == grid_run_ids(finished)
    for run_id in sorted(grid_run_ids(finished)):
        rerun = strict_json(workdir / "results" / "runs" / f"{run_id}.json")
        reference = strict_json(finished / "results" / "runs" / f"{run_id}.json")
        assert comparable(rerun) == comparable(reference), run_id


# ---------------------------------------------------------------- diverged runs


def diverging_run_ids(workdir: Path) -> set[str]:
    ids = set()
    for path in (workdir / "results" / "runs").glob("*.json"):
        if strict_json(path)["config"]["lr"] == DIVERGING_LR:
            ids.add(path.stem)
    return ids


def test_diverged_runs_are_valid_json(finished):
    diverging = diverging_run_ids(finished)

    assert len(diverging) == 3
    for run_id in diverging:
        record = strict_json(finished / "results" / "runs" / f"{run_id}.json")
        assert record["metrics"]["diverged"] is True, run_id
        assert record["metrics"]["val_loss"] is None, run_id
        assert record["metrics"]["test_loss"] is None, run_id


def test_finite_runs_are_not_diverged(finished):
    for path in (finished / "results" / "runs").glob("*.json"):
        if path.stem not in diverging_run_ids(finished):
            assert strict_json(path)["metrics"]["diverged"] is False, path.stem


def test_runs_table_marks_diverged(finished):
    rows = read_csv(finished / "results" / "tables" / "runs.csv")
    diverging = diverging_run_ids(finished)

    assert {row["run_id"] for row in rows if row["diverged"] == "True"} == diverging
    assert {row["run_id"] for row in rows if row["diverged"] == "False"} == grid_run_ids(finished) - diverging


def test_selection_skips_diverged_with_warning(finished):
    rows = read_csv(finished / "results" / "tables" / "figure1_runs.csv")
    gradient = [row for row in rows if row["curve"] == "Gradient Update"]
    log = (finished / "logs" / "aggregate" / "figure1.log").read_text()

    assert sorted(row["rank"] for row in gradient if row["diverged"] == "False") == ["1", "2"]
    assert all(float(row["lr"]) == 0.01 for row in gradient if row["diverged"] == "False")
    assert sorted(row["rank"] for row in gradient if row["diverged"] == "True") == ["1", "2"]
    for row in gradient:
        if row["diverged"] == "True":
            assert f"run {row['run_id']} diverged" in log
            assert "left out of the best-of-sweep selection" in log


def test_figure_summary_counts_diverged(finished):
    rows = read_csv(finished / "results" / "tables" / "figure1.csv")
    gradient = [row for row in rows if row["curve"] == "Gradient Update" and row["panel"] == "Random"]

    assert [row["x"] for row in gradient] == ["1", "2"]
    assert [row["n_seeds"] for row in gradient] == ["1", "1"]
    assert [row["n_diverged"] for row in gradient] == ["1", "1"]
    assert all(row["median"] != "" for row in gradient)


def test_rank_step_row_of_diverged_cell(finished):
    rows = read_csv(finished / "results" / "tables" / "rank_steps.csv")

    assert len(rows) == 1
    assert rows[0]["rank_step"] == "1"
    assert rows[0]["n_seeds"] == "0"
    assert rows[0]["n_diverged"] == "1"
    assert rows[0]["median"] == ""


def test_figures_build_with_diverged_runs(finished):
    assert (finished / "figures" / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (finished / "figures" / "figure1.pdf").read_bytes()[:5] == b"%PDF-"


def test_train_log_warns_diverged(finished):
    logs = "".join(path.read_text() for path in (finished / "logs" / "train").glob("*.log"))

    for run_id in diverging_run_ids(finished):
        assert f"run results/runs/{run_id}.json diverged" in logs, run_id


# ---------------------------------------------------------------- corrupt and foreign files


@pytest.fixture(scope="module")
def damaged(snakefile, finished, tmp_path_factory):
    """A copy of the finished folder with four bad files in results/runs, after a rerun of the workflow."""
    workdir = tmp_path_factory.mktemp("damaged") / "workdir"
    shutil.copytree(finished, workdir, symlinks=True)
    runs = workdir / "results" / "runs"
    ours = sorted(runs.glob("fnn-ours-*.json"))

    truncated = ours[0]
    text = truncated.read_text()
    truncated.write_text(text[: len(text) // 2])

    old_schema = ours[1]
    record = json.loads(old_schema.read_text())
    record["schema_version"] = 0
    old_schema.write_text(json.dumps(record))

    foreign = runs / "fnn-sgd-ffffffffffffffff.json"
    record = json.loads(text)
    record["config"]["seed"] = 99
    foreign.write_text(json.dumps(record))

    leftover = runs / f".{ours[0].name}.k3j2x1.tmp"
    leftover.write_text(text[:10])

    output = run_snakemake(snakefile, workdir)
    bad_files = {"truncated": truncated, "old schema": old_schema, "foreign": foreign, "leftover": leftover}
    return workdir, {kind: str(path.relative_to(workdir)) for kind, path in bad_files.items()}, output


def test_skipped_csv_names_each_bad_file(damaged):
    workdir, bad, _ = damaged
    reasons = {row["path"]: row["reason"] for row in read_csv(workdir / "results" / "tables" / "skipped.csv")}

    assert set(reasons) == set(bad.values())
    assert reasons[bad["truncated"]].startswith("not valid JSON")
    assert "delete it and rerun snakemake" in reasons[bad["truncated"]]
    assert reasons[bad["old schema"]].startswith("schema version 0, expected 1")
    assert reasons[bad["foreign"]].startswith("its configuration is not in the current grid")
    assert reasons[bad["leftover"]].startswith("temporary file of an interrupted write")


def test_runs_table_leaves_out_bad_files(damaged):
    workdir, bad, _ = damaged
    run_ids = {row["run_id"] for row in read_csv(workdir / "results" / "tables" / "runs.csv")}

    assert Path(bad["truncated"]).stem not in run_ids
    assert Path(bad["old schema"]).stem not in run_ids
    assert Path(bad["foreign"]).stem not in run_ids
    assert run_ids == grid_run_ids(workdir) - {Path(bad["truncated"]).stem, Path(bad["old schema"]).stem}


def test_aggregation_logs_each_bad_file(damaged):
    workdir, bad, _ = damaged
    log = (workdir / "logs" / "aggregate" / "runs_table.log").read_text()
    figure_log = (workdir / "logs" / "aggregate" / "figure1.log").read_text()

    for path in bad.values():
        assert f"skipped {path}: " in log, path
    assert "skipped 2 unreadable and 2 unexpected files" in log
    assert f"skipped {bad['truncated']}: not valid JSON" in figure_log


def test_sidecar_lists_skipped_files(damaged):
    workdir, bad, _ = damaged
    sidecar = json.loads((workdir / "results" / "tables" / "runs.csv.meta.json").read_text())

    assert {entry["path"] for entry in sidecar["skipped"]} == set(bad.values())


# ---------------------------------------------------------------- tied singular values


def test_tied_singular_values_warn(caplog):
    config = RunConfig(width=8, rank=3, target_depth=1, frozen_depth=2, init_mode="uniform_singular_values",
                       method="ours", activation="linear", use_bias=0, batch_size=16, n_test=100, seed=0)
    with caplog.at_level(logging.WARNING, logger="lora_expressivity.construction"):
        run(config)

    tied = [record for record in caplog.records if "are equal" in record.getMessage()]
    assert len(tied) == 1
    assert tied[0].name == "lora_expressivity.construction"
    assert "singular values 6 and 7" in tied[0].getMessage()


def test_distinct_singular_values_do_not_warn(caplog):
    config = RunConfig(width=8, rank=3, target_depth=1, frozen_depth=2, init_mode="default",
                       method="ours", activation="linear", use_bias=0, batch_size=16, n_test=100, seed=0)
    with caplog.at_level(logging.WARNING, logger="lora_expressivity.construction"):
        run(config)

    assert not [record for record in caplog.records if "are equal" in record.getMessage()]
