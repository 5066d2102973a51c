"""The reference's single-run command line, flag for flag, plus --output and --device."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, RunConfig
from .results import write_result

# Flags in the reference's order, with its types and defaults.
FLAGS = [
    ("width", int, 4, "model width D (embedding size for the transformer)"),
    ("target_depth", int, 1, "depth of the target model"),
    ("frozen_depth", int, 2, "depth of the frozen model (ignored by the transformer)"),
    ("rank", int, 2, "LoRA rank R"),
    ("use_bias", int, 1, "1: the FNNs have biases; 0: they do not"),
    ("activation", str, "relu", "activation of the FNNs: relu or linear"),
    ("std", float, 0.25, "standard deviation of the adapters' B at creation"),
    ("method", str, "ours", "ours (the construction), sgd (LoRA by gradient update) or flt (final layers tuning)"),
    ("batch_size", int, 5000, "batch size of gradient steps; batch of z for the construction's biases"),
    ("n_epochs", int, 1000, "number of gradient steps"),
    ("lr", float, 1e-3, "learning rate of the gradient methods"),
    ("n_test", int, 10000, "number of test inputs"),
    ("weight_decay", float, 0, "L2 weight decay of Adam"),
    ("init_mode", str, "default", "default or uniform_singular_values (equal singular values of the error matrix)"),
    ("pretrained", int, 0, "1: pretrain the frozen model towards the target first"),
    ("pretrained_epochs", int, 1000, "maximum number of pretraining steps"),
    ("pretrained_lr", float, 1e-3, "learning rate of pretraining"),
    ("pretrained_level", int, 3, "stop pretraining once the loss is below initial loss / level"),
    ("tune_bias", int, 1, "1: LoRA by gradient update also tunes the FNN biases"),
    ("last_layers", int, 1, "number of final layers that flt tunes"),
    ("seed", int, 123, "random seed"),
    ("rank_step", int, 0, "per-layer rank change: layer l gets rank + rank_step * l (clipped to 0..width)"),
    ("n_head", int, 2, "number of attention heads of the transformer"),
    ("seq_length", int, 10, "sequence length of the transformer's inputs"),
    ("exp", str, "fnn", "model: fnn or tfn"),
    ("wandb", int, 0, "1: log the run to Weights & Biases"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run one experiment of 'The Expressive Power of Low-Rank Adaptation'.",
    )
    for name, kind, default, help_text in FLAGS:
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{help_text} (default: {default})")
    parser.add_argument("--ranks", type=int, nargs="+", default=None,
                        help="explicit per-layer ranks of the frozen FNN, one per layer (replaces --rank_step)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--output", default=None, help="write the result record to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    settings = {name: getattr(args, name) for name, *_ in FLAGS if name != "wandb"}
    settings.update(ranks=args.ranks, device=args.device)
    try:
        config = RunConfig(**settings).validate()
        wandb_run = _start_wandb(args) if args.wandb else None
        if args.output:
            _check_writable(args.output)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print("Experiment Setting:")
    for name, *_ in FLAGS:
        print(f"| {name}: {getattr(args, name)}")

    from .experiment import run

    try:
        result = run(config, echo=lambda line: print(line, flush=True))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in result.to_dict().items() if isinstance(v, (int, float)) and v is not None})
        wandb_run.finish()
    if args.output:
        write_result(args.output, result)
    return 0


def _start_wandb(args):
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb 1 needs the wandb package; install it with 'pip install wandb' "
                          "or run with --wandb 0") from None
    return wandb.init(project="lora-expressivity", config=vars(args))


def _check_writable(path: str):
    import os
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"--output {path}: the folder {directory} does not exist; create it first")
