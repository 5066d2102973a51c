"""Running the real workflow in a temporary copy of the repository."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("Snakefile", "rules", "scripts", "src", "config", "report", "envs")


def copy_workflow(destination: Path) -> Path:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, destination / name)
    return destination


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    completed = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule name -> job count of a dry run (empty when there is nothing to do)."""
    completed = snakemake(workdir, "--dry-run", *args)
    text = completed.stdout + completed.stderr
    if "Nothing to be done" in text:
        return {}
    return job_counts(text)


def job_counts(text: str) -> dict[str, int]:
    """Rule name -> job count from the "Job stats:" table of Snakemake's output."""
    counts = {}
    for line in text.split("Job stats:", 1)[1].splitlines()[3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if match is None:
            break
        if match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts
