"""The Snakemake workflow run for real: outputs, and what a change reruns."""

import json

import pytest
import yaml

from workflow_helpers import ROOT, copy_workflow, planned_jobs, snakemake

FIGURES = ["figure1", "figure2", "fnn_approx", "fnn_approx_pretrained", "tfn_approx", "tfn_approx_pretrained",
           "flt_approx", "lora_bitfit_approx"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny"))
    snakemake(workdir, "--configfile", str(ROOT / "tests" / "data" / "tiny.yaml"))
    return workdir


def test_every_figure_and_table(tiny_run):
    for figure in FIGURES:
        assert (tiny_run / "figures" / f"{figure}.pdf").stat().st_size > 1000, figure
        assert (tiny_run / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG", figure
        assert (tiny_run / "results" / "tables" / f"{figure}.csv").exists(), figure
    markdown = (tiny_run / "results" / "tables" / "rank_steps.md").read_text()
    assert "| pretrained | rank | rank_step |" in markdown


def test_one_json_per_run(tiny_run):
    runs = (tiny_run / "results" / "configs" / "runs.tsv").read_text().splitlines()[1:]
    files = sorted((tiny_run / "results" / "runs").glob("*.json"))
    assert len(files) == len(runs)
    record = json.loads(files[0].read_text())
    assert record["schema_version"] == 1
    assert set(record) >= {"config", "metrics", "environment", "config_hash"}
    assert set(record["environment"]) >= {"package_version", "torch", "python", "device", "threads", "git_commit"}


def test_complete_run_leaves_nothing_to_do(tiny_run):
    assert planned_jobs(tiny_run, "--configfile", str(ROOT / "tests" / "data" / "tiny.yaml")) == {}


@pytest.fixture
def rerun_workflow(tmp_path):
    workdir = copy_workflow(tmp_path)
    config = workdir / "rerun.yaml"
    config.write_text((ROOT / "tests" / "data" / "rerun.yaml").read_text())
    snakemake(workdir, "--configfile", str(config))
    assert planned_jobs(workdir, "--configfile", str(config)) == {}
    return workdir, config


def test_new_rank_reruns_only_its_batches(rerun_workflow):
    workdir, config = rerun_workflow
    grid = yaml.safe_load(config.read_text())
    grid["experiments"]["linear"]["rank"].append(3)
    config.write_text(yaml.safe_dump(grid))

    jobs = planned_jobs(workdir, "--configfile", str(config))
    training = {rule for rule in jobs if rule.startswith("train_")}
    # The linear experiment is one batch (ours and sgd share it); the relu batch is untouched.
    assert len(training) == 1
    assert jobs.get("figure_table") == 1
    assert jobs.get("figure") == 1
    assert "rank_step_table" not in jobs


def test_plot_script_edit_reruns_only_figures(rerun_workflow):
    workdir, config = rerun_workflow
    script = workdir / "scripts" / "plot_figure.py"
    script.write_text(script.read_text() + "\n# edited\n")
    jobs = planned_jobs(workdir, "--configfile", str(config))
    assert set(jobs) == {"figure", "all"}
    assert jobs["figure"] == 3


def test_model_code_edit_reruns_training(rerun_workflow):
    workdir, config = rerun_workflow
    # Snakemake compares checksums of inputs, so a change must alter the content.
    models = workdir / "src" / "lora_expressivity" / "models.py"
    models.write_text(models.read_text() + "\n# edited\n")
    jobs = planned_jobs(workdir, "--configfile", str(config))
    assert sum(count for rule, count in jobs.items() if rule.startswith("train_")) == 2
    assert jobs["figure"] == 3


def test_lint_is_clean():
    completed = snakemake(ROOT, "--lint", check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Lints for" not in completed.stdout + completed.stderr
