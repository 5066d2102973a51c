"""The workflow on a one-node SLURM cluster started for the test, through profiles/slurm.

run_slurm_test.py sets up the cluster and defines the checks, which its
docstring lists. The cluster starts once per module and runs the workflow once, and each
test below checks one property of that run. As root, the fixture installs
slurm-wlm and munge with apt-get when they are missing. Without root, or when
the installation fails, every test marked cluster is skipped with the reason.
Select them with `pytest -m cluster`, or leave them out with `-m "not cluster"`.
"""

import pytest

import run_slurm_test as slurm


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    try:
        slurm.require_slurm()
    except slurm.SlurmUnavailable as error:
        pytest.skip(f"no local SLURM cluster: {error}")
    base = tmp_path_factory.mktemp("slurm")
    with slurm.LocalSlurmCluster(base) as cluster:
        run = slurm.run_workflow(cluster, base / "work")
    print(slurm.describe_jobs(run))
    return run


@pytest.mark.cluster
def test_workflow_succeeds(workflow_run):
    problems = slurm.check_workflow_succeeded(workflow_run)
    assert not problems, "\n".join(problems)


@pytest.mark.cluster
def test_figures_written(workflow_run):
    problems = slurm.check_figures_written(workflow_run)
    assert not problems, "\n".join(problems)


@pytest.mark.cluster
def test_each_training_job_on_slurm(workflow_run):
    problems = slurm.check_training_jobs_on_slurm(workflow_run)
    assert not problems, "\n".join(problems)


@pytest.mark.cluster
def test_training_jobs_request_one_gpu(workflow_run):
    problems = slurm.check_training_jobs_request_one_gpu(workflow_run)
    assert not problems, "\n".join(problems)


@pytest.mark.cluster
def test_gpus_only_for_training(workflow_run):
    problems = slurm.check_gpus_only_for_training(workflow_run)
    assert not problems, "\n".join(problems)


@pytest.mark.cluster
def test_light_rules_run_locally(workflow_run):
    problems = slurm.check_light_rules_local(workflow_run)
    assert not problems, "\n".join(problems)


@pytest.mark.cluster
def test_status_queries_use_squeue(workflow_run):
    problems = slurm.check_status_queries_use_squeue(workflow_run)
    assert not problems, "\n".join(problems)


def test_scontrol_job_parsing():
    line = (
        "JobId=7 JobName=a b UserId=root(0) JobState=RUNNING ExitCode=0:0 "
        "Comment=rule_figure_table_wildcards_figure1  Nodes=localhost CPU_IDs=0 Mem=1000 "
        "GRES=gpu:1(IDX:0) TresPerJob=gres:gpu:1"
    )
    [fields] = slurm.parse_scontrol_jobs("No header\n" + line)
    assert fields["JobName"] == "a b"
    assert fields["Comment"] == "rule_figure_table_wildcards_figure1"
    assert slurm.gpu_count(fields["GRES"]) == 1
    assert slurm.gpu_count(fields["TresPerJob"]) == 1
    assert slurm.gpu_count("gres/gpu:a100=2") == 2
    assert slurm.gpu_count("cpu=1,mem=1000M") == 0
    assert slurm.SlurmJob("7", comment=fields["Comment"]).rule == "figure_table"
