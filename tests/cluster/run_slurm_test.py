#!/usr/bin/env python3
"""Run the workflow through profiles/slurm on a one-node SLURM cluster started on this machine.

The script installs the Debian packages slurm-wlm and munge when they are
missing, writes slurm.conf and gres.conf into a temporary directory, and starts
munged, slurmctld and slurmd from there with PID files. The node has 2 CPUs and
2 GPUs whose device files are plain files, and there is no accounting database,
so Snakemake queries job states with squeue. It then runs the grid of
tests/cluster/grid.yaml with profiles/slurm/gpu.yaml through profiles/slurm and
checks that

- the workflow succeeds and writes its figures,
- every training job ran as one SLURM job that requested exactly one GPU,
- every SLURM job that requested a GPU is a training job,
- the light rules ran on this machine, not as SLURM jobs,
- the job states came from squeue, without a fallback to sacct.

At the end it cancels the remaining jobs and stops each daemon it started by
its PID, also when a step fails. Clients reach the daemons through 127.0.0.1
only, but slurmctld and slurmd listen on every interface, on two free ports
chosen at start.

Usage, as root:  python tests/cluster/run_slurm_test.py [--keep]
Exit status: 0 when every check passes, 1 when one fails, 77 when SLURM cannot
run here (not root, or the packages cannot be installed).
tests/cluster/test_slurm.py runs the same steps under pytest.
"""

from __future__ import annotations

import argparse
import ctypes
import getpass
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# The script also runs outside pytest, so it finds the shared test helpers itself.
sys.path.insert(0, str(ROOT / "tests"))
from workflow_helpers import job_counts  # noqa: E402

SNAKEFILE = ROOT / "Snakefile"
PROFILE = ROOT / "profiles" / "slurm"
GPU_CONFIG = PROFILE / "gpu.yaml"
GRID = Path(__file__).resolve().with_name("grid.yaml")

PACKAGES = ("slurm-wlm", "munge")
PROGRAMS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
# profiles/slurm submits to the partition `gpu`, so the test cluster has one of that name.
PARTITION = "gpu"
NODE = "localhost"
NODE_CPUS = 2
NODE_GPUS = 2
NODE_MEMORY_MB = 4000
# Rules that should run on the submitting machine; the other rules train.
LIGHT_RULES = ("runs_table_of_grid", "runs_table", "figure_table", "rank_step_table", "figure")
TRAINING_RULE_PREFIX = "train_"

DAEMON_START_TIMEOUT_S = 60
DAEMON_STOP_TIMEOUT_S = 30
WORKFLOW_TIMEOUT_S = 900
JOB_POLL_INTERVAL_S = 1.0

log = logging.getLogger("slurm_test")


class SlurmUnavailable(Exception):
    """Reason why SLURM cannot run on this machine: the process is not root, or the packages cannot be installed."""


def search_path() -> str:
    """PATH with the sbin directories, where Debian installs the SLURM and munge daemons."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    for directory in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if directory not in parts:
            parts.append(directory)
    return os.pathsep.join(part for part in parts if part)


def missing_programs() -> list[str]:
    return [program for program in PROGRAMS if shutil.which(program, path=search_path()) is None]


def require_slurm():
    """Install slurm-wlm and munge from Debian when they are missing.

    Raises SlurmUnavailable when this process is not root, when apt-get is not
    found, or when the installation fails.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("the SLURM test must run as root, because slurmd starts jobs as root; run it with sudo")
    missing = missing_programs()
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            f"{', '.join(missing)} not found, and apt-get is not available to install {' '.join(PACKAGES)}"
        )

    log.info("installing %s because %s are missing", " ".join(PACKAGES), ", ".join(missing))
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": search_path()}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    completed = subprocess.run(install, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        log.info("apt-get install failed, retrying after apt-get update")
        subprocess.run(["apt-get", "update", "-q"], env=environment, capture_output=True, text=True)
        completed = subprocess.run(install, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SlurmUnavailable(
            f"installing {' '.join(PACKAGES)} failed (apt-get exit status {completed.returncode}): "
            f"{completed.stderr.strip()[-2000:]}"
        )
    still_missing = missing_programs()
    if still_missing:
        raise SlurmUnavailable(f"{', '.join(still_missing)} not found after installing {' '.join(PACKAGES)}")


def free_ports(count: int) -> list[int]:
    """Return ports that nothing listens on now.

    The daemons bind them a moment later, so another process could take one in between.
    """
    sockets = []
    try:
        for _ in range(count):
            candidate = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            candidate.bind(("127.0.0.1", 0))
            sockets.append(candidate)
        return [candidate.getsockname()[1] for candidate in sockets]
    finally:
        for candidate in sockets:
            candidate.close()


def stop_with_parent():
    """Ask Linux to send SIGTERM to this child when the test process dies, so no daemon outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def log_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalSlurmCluster:
    """munged, slurmctld and one slurmd named localhost, configured and run from one directory.

    Use it as a context manager: entering starts the daemons and waits until the
    node is idle, leaving cancels every job and stops the daemons by PID.
    """

    def __init__(self, base: Path):
        self.base = Path(base)
        self.etc = self.base / "etc"
        self.run_dir = self.base / "run"
        self.key_dir = self.base / "munge-key"
        self.log_dir = self.base / "log"
        self.bin_dir = self.base / "bin"
        self.slurm_conf = self.etc / "slurm.conf"
        self.munge_socket = self.run_dir / "munge.socket"
        self.daemons: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> "LocalSlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def environment(self) -> dict:
        """Return the environment for SLURM clients and Snakemake, with SLURM_CONF set to this cluster's file."""
        path = os.pathsep.join((str(self.bin_dir), search_path()))
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf), "PATH": path}

    def command(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(argv, env=self.environment(), capture_output=True, text=True, timeout=timeout)

    def start(self):
        self.write_configuration()
        self.spawn("munged", [
            "munged", "--foreground", "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={self.key_dir / 'munge.key'}",
            f"--pid-file={self.run_dir / 'munged.pid'}",
            f"--log-file={self.log_dir / 'munged.log'}",
            f"--seed-file={self.run_dir / 'munged.seed'}",
        ])
        self.wait_until("munged", self.munge_works)
        # -i starts from an empty state, and -D keeps the daemon in the foreground as a child of this process.
        self.spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.slurm_conf)])
        self.wait_until("slurmctld", self.controller_is_up)
        self.spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.slurm_conf)])
        self.wait_until("slurmd", self.node_is_idle)
        log.info("SLURM cluster is up: node %s with %d CPUs and %d GPUs, configuration %s",
                 NODE, NODE_CPUS, NODE_GPUS, self.slurm_conf)

    def write_configuration(self):
        for directory in (self.etc, self.run_dir, self.log_dir, self.base / "state", self.base / "spool",
                          self.base / "gpus"):
            directory.mkdir(parents=True, exist_ok=True)
        # munged warns unless every directory above its socket is searchable by all users.
        self.base.chmod(0o755)
        self.key_dir.mkdir(mode=0o700, exist_ok=True)
        key = self.key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

        # slurmd refuses a GPU without a device file, and it accepts plain files
        # there with an error in its log. No process opens them.
        gpu_files = []
        for index in range(NODE_GPUS):
            gpu_file = self.base / "gpus" / f"gpu{index}"
            gpu_file.touch()
            gpu_files.append(gpu_file)
        (self.etc / "gres.conf").write_text(
            "".join(f"NodeName={NODE} Name=gpu File={gpu_file}\n" for gpu_file in gpu_files)
        )

        controller_port, node_port = free_ports(2)
        physical_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        memory_mb = min(NODE_MEMORY_MB, physical_mb * 9 // 10)
        settings = {
            "ClusterName": "lora-test",
            "SlurmctldHost": f"{NODE}(127.0.0.1)",
            "SlurmctldPort": controller_port,
            "SlurmdPort": node_port,
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "MailProg": "/bin/true",
            "StateSaveLocation": self.base / "state",
            "SlurmdSpoolDir": self.base / "spool",
            "SlurmctldPidFile": self.run_dir / "slurmctld.pid",
            "SlurmdPidFile": self.run_dir / "slurmd.pid",
            "SlurmctldLogFile": self.log_dir / "slurmctld.log",
            "SlurmdLogFile": self.log_dir / "slurmd.log",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "SchedulerType": "sched/backfill",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core_Memory",
            "GresTypes": "gpu",
            # Without a default, a job that requests no memory gets the whole node.
            "DefMemPerCPU": 500,
            # squeue reports a finished job for MinJobAge seconds. The plugin needs
            # at least 3 status intervals (3 x 10 s in profiles/slurm) or it falls back to sacct.
            "MinJobAge": 300,
            "ReturnToService": 2,
            # Use the CPUs and memory below even where the machine has other numbers.
            "SlurmdParameters": "config_overrides",
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={memory_mb} "
                     f"Gres=gpu:{NODE_GPUS} State=UNKNOWN")
        lines.append(f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP")
        self.slurm_conf.write_text("\n".join(lines) + "\n")
        self.write_srun_wrapper()

    def write_srun_wrapper(self):
        """Put an srun first on PATH that reads this cluster's slurm.conf.

        Inside a job, snakemake-executor-plugin-slurm-jobstep (0.6.1) starts the
        rule through srun with every SLURM_* variable removed, SLURM_CONF
        included, so srun would look for /etc/slurm/slurm.conf. A real cluster
        has its configuration there; this test leaves /etc alone.
        """
        srun = shutil.which("srun", path=search_path())
        if srun is None:
            raise RuntimeError("srun not found; install the slurm-client package")
        self.bin_dir.mkdir(exist_ok=True)
        wrapper = self.bin_dir / "srun"
        wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(self.slurm_conf))} exec {shlex.quote(srun)} "$@"\n')
        wrapper.chmod(0o755)

    def spawn(self, name: str, argv: list[str]):
        output = open(self.log_dir / f"{name}.out", "w")
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=self.environment(),
                                   preexec_fn=stop_with_parent)
        output.close()
        self.daemons.append((name, process))
        log.info("started %s with PID %d", name, process.pid)

    def wait_until(self, name: str, ready, timeout: float = DAEMON_START_TIMEOUT_S):
        process = dict(self.daemons)[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode} during start; "
                                   f"its output:\n{log_tail(self.log_dir / f'{name}.out')}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{name} was not ready after {timeout} s; its output:\n"
                           f"{log_tail(self.log_dir / f'{name}.out')}")

    def munge_works(self) -> bool:
        socket_option = f"--socket={self.munge_socket}"
        credential = subprocess.run(["munge", "-n", socket_option], capture_output=True, env=self.environment())
        if credential.returncode != 0:
            return False
        decoded = subprocess.run(["unmunge", socket_option], input=credential.stdout, capture_output=True,
                                 env=self.environment())
        return decoded.returncode == 0

    def controller_is_up(self) -> bool:
        return "is UP" in self.command("scontrol", "ping").stdout

    def node_is_idle(self) -> bool:
        state = self.command("sinfo", "--noheader", f"--nodes={NODE}", "--format=%T").stdout.strip()
        return state == "idle"

    def active_jobs(self) -> list[str]:
        completed = self.command("squeue", "--noheader", "--states=PENDING,CONFIGURING,RUNNING,COMPLETING",
                                 "--format=%i")
        return completed.stdout.split()

    def cancel_jobs(self):
        """Cancel the jobs of this user on this cluster and wait up to 30 s until none is left."""
        try:
            jobs = self.active_jobs()
            if not jobs:
                return
            log.info("cancelling SLURM jobs %s", " ".join(jobs))
            self.command("scancel", f"--user={getpass.getuser()}")
            deadline = time.monotonic() + DAEMON_STOP_TIMEOUT_S
            while self.active_jobs() and time.monotonic() < deadline:
                time.sleep(1)
        except (OSError, subprocess.SubprocessError) as error:
            log.warning("cancelling the remaining SLURM jobs failed: %s", error)

    def stop(self):
        """Cancel the remaining jobs, then stop slurmd, slurmctld and munged by PID."""
        running = {name for name, process in self.daemons if process.poll() is None}
        if {"slurmctld", "munged"} <= running:
            self.cancel_jobs()
        for name, process in reversed(self.daemons):
            if process.poll() is not None:
                log.info("%s (PID %d) had already exited with status %d", name, process.pid, process.returncode)
                continue
            process.terminate()
            try:
                process.wait(timeout=DAEMON_STOP_TIMEOUT_S)
                log.info("stopped %s (PID %d)", name, process.pid)
            except subprocess.TimeoutExpired:
                log.warning("%s (PID %d) ignored SIGTERM for %d s; sending SIGKILL",
                            name, process.pid, DAEMON_STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        self.daemons.clear()


@dataclass
class SlurmJob:
    """State, GPU request and GPU allocation of one SLURM job, as scontrol reported them."""

    job_id: str
    comment: str = ""
    state: str = ""
    exit_code: str = ""
    gpus_requested: int = 0
    # GPUs SLURM allocated, seen only while the job was running.
    gpus_allocated: int | None = None

    @property
    def rule(self) -> str | None:
        """Return the rule name from the comment that the plugin gives each job (rule_<name>[_wildcards_...])."""
        if not self.comment.startswith("rule_"):
            return None
        return self.comment[len("rule_"):].split("_wildcards_", 1)[0]


def parse_scontrol_jobs(text: str) -> list[dict[str, str]]:
    """Fields of each job in `scontrol show job --details --oneliner` output."""
    jobs = []
    for line in text.splitlines():
        if not line.startswith("JobId="):
            continue
        fields: dict[str, str] = {}
        key = None
        for token in line.split():
            name, separator, value = token.partition("=")
            if separator:
                key = name
                fields[key] = value
            elif key is not None:
                # A value with a space in it, such as a job name.
                fields[key] += " " + token
        jobs.append(fields)
    return jobs


def gpu_count(text: str) -> int:
    """GPUs in a TRES or GRES string such as gres:gpu:1, gres/gpu=2 or gpu:1(IDX:0)."""
    match = re.search(r"gpu(?::[A-Za-z0-9_.]+)?[:=](\d+)", text or "")
    return int(match.group(1)) if match else 0


class JobMonitor(threading.Thread):
    """Thread that polls scontrol while the workflow runs and records every job it reports."""

    def __init__(self, cluster: LocalSlurmCluster):
        super().__init__(name="slurm-job-monitor", daemon=True)
        self.cluster = cluster
        self.jobs: dict[str, SlurmJob] = {}
        self.failed_polls = 0
        self._stopped = threading.Event()

    def run(self):
        while not self._stopped.wait(JOB_POLL_INTERVAL_S):
            self.poll()

    def stop(self):
        self._stopped.set()
        self.join()
        self.poll()

    def poll(self):
        try:
            completed = self.cluster.command("scontrol", "show", "job", "--details", "--oneliner")
        except (OSError, subprocess.SubprocessError) as error:
            self.failed_polls += 1
            log.warning("scontrol show job failed: %s", error)
            return
        if completed.returncode != 0:
            self.failed_polls += 1
            return
        for fields in parse_scontrol_jobs(completed.stdout):
            job = self.jobs.setdefault(fields["JobId"], SlurmJob(fields["JobId"]))
            job.comment = fields.get("Comment", job.comment)
            job.state = fields.get("JobState", job.state)
            job.exit_code = fields.get("ExitCode", job.exit_code)
            job.gpus_requested = gpu_count(fields.get("TresPerJob", "")) or gpu_count(fields.get("TresPerNode", ""))
            if "GRES" in fields:
                job.gpus_allocated = max(job.gpus_allocated or 0, gpu_count(fields["GRES"]))


@dataclass
class WorkflowRun:
    """A finished Snakemake run on the test cluster and what the checks need of it."""

    workdir: Path
    returncode: int
    output: str
    duration_s: float
    planned: dict[str, int]
    jobs: list[SlurmJob] = field(default_factory=list)

    @property
    def planned_training_rules(self) -> set[str]:
        return {rule for rule in self.planned if rule.startswith(TRAINING_RULE_PREFIX)}


def snakemake_command(workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir),
        "--profile", str(PROFILE),
        "--configfile", str(GRID), str(GPU_CONFIG),
        # There is no accounting database, so sacct cannot report job states.
        "--slurm-status-command", "squeue",
        *extra,
    ]


def planned_jobs(cluster: LocalSlurmCluster, workdir: Path) -> dict[str, int]:
    """Rule name -> job count of a dry run."""
    completed = subprocess.run(snakemake_command(workdir, "--dry-run"), env=cluster.environment(),
                               capture_output=True, text=True, timeout=300)
    text = completed.stdout + completed.stderr
    if completed.returncode != 0 or "Job stats:" not in text:
        raise RuntimeError(f"the dry run failed with status {completed.returncode}:\n{text[-3000:]}")
    return job_counts(text)


def stop_session(process: subprocess.Popen):
    """Stop a process that leads its own session, and everything in that session, by its PID."""
    log.info("stopping Snakemake (PID %d) and its local jobs", process.pid)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=DAEMON_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("Snakemake (PID %d) ignored SIGTERM for %d s; sending SIGKILL", process.pid, DAEMON_STOP_TIMEOUT_S)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_workflow(cluster: LocalSlurmCluster, workdir: Path) -> WorkflowRun:
    """Run the test grid through profiles/slurm, recording every SLURM job while it runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    planned = planned_jobs(cluster, workdir)
    log.info("planned jobs: %s", ", ".join(f"{rule} x{count}" for rule, count in planned.items()))

    monitor = JobMonitor(cluster)
    monitor.start()
    output_path = workdir.parent / "snakemake.log"
    started = time.monotonic()
    with open(output_path, "w") as output:
        # A session of its own, so that a timeout can stop Snakemake and the jobs it runs here.
        process = subprocess.Popen(snakemake_command(workdir), cwd=workdir, env=cluster.environment(),
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=WORKFLOW_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("Snakemake (PID %d) timed out after %d s", process.pid, WORKFLOW_TIMEOUT_S)
        finally:
            # Also reached on an interrupt, which the session of its own does not pass on.
            if process.poll() is None:
                stop_session(process)
            returncode = process.returncode
            duration_s = time.monotonic() - started
            monitor.stop()
    log.info("Snakemake exited with status %d after %.0f s; its output is in %s", returncode, duration_s, output_path)
    if monitor.failed_polls:
        log.warning("%d polls of scontrol failed", monitor.failed_polls)
    return WorkflowRun(workdir, returncode, output_path.read_text(errors="replace"), duration_s, planned,
                       sorted(monitor.jobs.values(), key=lambda job: int(job.job_id)))


# Each check returns a list of problems, which is empty when the check passes.


def check_workflow_succeeded(run: WorkflowRun) -> list[str]:
    if run.returncode == 0:
        return []
    return [f"Snakemake exited with status {run.returncode}; the end of its output:\n{run.output[-4000:]}"]


def check_figures_written(run: WorkflowRun) -> list[str]:
    figures = yaml.safe_load(GRID.read_text())["figures"]
    problems = []
    for figure in figures:
        for suffix in ("pdf", "png"):
            path = run.workdir / "figures" / f"{figure}.{suffix}"
            if not path.is_file() or path.stat().st_size == 0:
                problems.append(f"{path} is missing or empty")
    return problems


def check_training_jobs_on_slurm(run: WorkflowRun) -> list[str]:
    """Every planned training rule ran as exactly one SLURM job, which completed."""
    problems = []
    if not run.planned_training_rules:
        problems.append("the dry run planned no training job")
    for rule in sorted(run.planned_training_rules):
        jobs = [job for job in run.jobs if job.rule == rule]
        if len(jobs) != 1:
            problems.append(f"{rule}: expected one SLURM job, found {len(jobs)}")
        for job in jobs:
            if job.state != "COMPLETED" or job.exit_code != "0:0":
                problems.append(f"{rule}: SLURM job {job.job_id} ended {job.state} with exit code {job.exit_code}")
    return problems


def check_training_jobs_request_one_gpu(run: WorkflowRun) -> list[str]:
    problems = []
    training = [job for job in run.jobs if (job.rule or "").startswith(TRAINING_RULE_PREFIX)]
    for job in training:
        if job.gpus_requested != 1:
            problems.append(f"{job.rule}: SLURM job {job.job_id} requested {job.gpus_requested} GPUs, expected 1")
        if job.gpus_allocated not in (None, 1):
            problems.append(f"{job.rule}: SLURM job {job.job_id} was allocated {job.gpus_allocated} GPUs, expected 1")
    if training and all(job.gpus_allocated is None for job in training):
        problems.append("no training job was seen running, so no GPU allocation was checked")
    return problems


def check_gpus_only_for_training(run: WorkflowRun) -> list[str]:
    return [
        f"SLURM job {job.job_id} ({job.comment or 'no comment'}) requested {job.gpus_requested} GPUs "
        f"but is not a training job"
        for job in run.jobs
        if job.gpus_requested and not (job.rule or "").startswith(TRAINING_RULE_PREFIX)
    ]


def check_light_rules_local(run: WorkflowRun) -> list[str]:
    submitted = sorted({job.rule for job in run.jobs if job.rule in LIGHT_RULES})
    if not submitted:
        return []
    return [
        f"the light rules {', '.join(submitted)} ran as SLURM jobs; declare them in a localrules "
        f"directive of the workflow (localrules: {', '.join(LIGHT_RULES)})"
    ]


def check_status_queries_use_squeue(run: WorkflowRun) -> list[str]:
    if "Falling back to 'sacct'" in run.output:
        return ["the SLURM plugin fell back to sacct for job states; MinJobAge is below 3 status intervals"]
    return []


CHECKS = (
    check_workflow_succeeded,
    check_figures_written,
    check_training_jobs_on_slurm,
    check_training_jobs_request_one_gpu,
    check_gpus_only_for_training,
    check_light_rules_local,
    check_status_queries_use_squeue,
)


def describe_jobs(run: WorkflowRun) -> str:
    lines = [f"{'job':>5}  {'rule':<32} {'state':<10} {'exit':<5} gpus requested/allocated"]
    for job in run.jobs:
        allocated = "-" if job.gpus_allocated is None else job.gpus_allocated
        lines.append(f"{job.job_id:>5}  {job.rule or job.comment:<32} {job.state:<10} {job.exit_code:<5} "
                     f"{job.gpus_requested}/{allocated}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configuration, logs, workflow outputs) after a pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM raises SystemExit, so the daemons are stopped as on any other failure.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    started = time.monotonic()
    try:
        require_slurm()
    except SlurmUnavailable as error:
        log.warning("skipped: %s", error)
        return 77

    base = Path(tempfile.mkdtemp(prefix="lora-slurm-"))
    log.info("cluster directory: %s", base)
    problems = ["the run did not finish"]
    try:
        with LocalSlurmCluster(base) as cluster:
            run = run_workflow(cluster, base / "work")
        print(describe_jobs(run))
        problems = [problem for check in CHECKS for problem in check(run)]
    finally:
        if problems or args.keep:
            log.info("kept %s for inspection", base)
        else:
            shutil.rmtree(base, ignore_errors=True)
    for problem in problems:
        log.error("%s", problem)
    log.info("%s after %.0f s in total", "FAILED" if problems else "passed", time.monotonic() - started)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
