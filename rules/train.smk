# Training jobs: one per batch of runs that differ only in batched settings
# (ranks, sweep values, ...). Each job writes one JSON per run.

for _batch in BATCHES:

    rule:
        name:
            f"train_{_batch.batch_id.replace('-', '_')}"
        input:
            code=TRAINING_CODE,
        output:
            _batch.outputs,
        params:
            configs=[run.config.to_dict() for run in _batch.runs],
            run_ids=[run.run_id for run in _batch.runs],
            device=TRAIN["device"],
        log:
            f"logs/train/{_batch.batch_id}.log",
        threads: TRAIN["threads"]
        resources:
            mem_mb=TRAIN["mem_mb"],
            runtime=TRAIN["runtime"],
            gpu=TRAIN["gpu"],
        conda:
            "../envs/train.yaml"
        script:
            "../scripts/train.py"
