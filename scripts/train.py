"""Train one batch of runs and write one result JSON per run."""

import sys
import time

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821

import torch  # noqa: E402

from lora_expressivity.config import RunConfig  # noqa: E402
from lora_expressivity.engine import run_batch  # noqa: E402
from lora_expressivity.results import write_result  # noqa: E402
from lora_expressivity.workflow import log_to  # noqa: E402

log = log_to(snakemake.log[0])  # noqa: F821
threads = snakemake.threads  # noqa: F821
torch.set_num_threads(threads)

configs = [RunConfig.from_dict(settings) for settings in snakemake.params.configs]  # noqa: F821
log.info("training %d runs on device %s with %d threads", len(configs), snakemake.params.device, threads)  # noqa: F821
started = time.perf_counter()
results = run_batch(configs, device=snakemake.params.device)  # noqa: F821

for config, result, path in zip(configs, results, snakemake.output):  # noqa: F821
    write_result(path, result, config_hash=config.config_hash(), threads=threads)
    if result.diverged:
        log.warning("run %s diverged: a loss is not finite; its JSON marks it as diverged", path)
log.info("finished %d runs in %.1f s", len(configs), time.perf_counter() - started)
