"""``lowformer train CONFIG [--a.b value ...] --path RUN_DIR [--resume]``; also under torchrun:
``torchrun --nproc_per_node=N -m lowformer train ...`` (nccl on GPUs, gloo on the CPU).

Flags are spelled with dashes; the underscore spellings (``--manual_seed``, the original's) are aliases."""
from __future__ import annotations

import argparse
import json
import logging
import os

from lowformer.errors import LowformerError
from lowformer.train import AMP_MODES, load_config, train


def _flag(p: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    """A dashed flag with its underscore spelling as an alias."""
    names = [name] + ([f"--{name[2:].replace('-', '_')}"] if "-" in name[2:] else [])
    p.add_argument(*names, **kwargs)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a recipe (configs/cls/imagenet/*.yaml), resumable, one process or torchrun",
        allow_abbrev=False,
        description="Train with a YAML recipe. Unknown '--a.b value' arguments override config keys, e.g. "
                    "--data_provider.data_dir /data/imagenet --run_config.n_epochs 5 "
                    "--data_provider.image_size \"[128,160,192,224]\".")
    p.add_argument("config", help="recipe file, e.g. configs/cls/imagenet/b1.yaml (the shipped ones work from anywhere)")
    add_train_arguments(p)
    p.set_defaults(func=run, accepts_overrides=True)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's flags, shared by ``train``, ``det train`` and ``seg train`` (one trainer, one vocabulary)."""
    p.add_argument("--path", required=True, help="run directory (checkpoints, metrics.csv, summary.json, TensorBoard)")
    p.add_argument("--resume", action="store_true", help="continue the run in --path from its last committed epoch")
    _flag(p, "--allow-config-change", action="store_true",
          help="with --resume: accept a config that changes the model or the schedule of the stored run")
    _flag(p, "--initial-checkpoint", default=None, metavar="FILE",
          help="start from these weights (any checkpoint layout); a classifier of another class count is "
               "re-initialised")
    _flag(p, "--manual-seed", type=int, default=0, help="seed: initial weights, data order (default 0)")
    p.add_argument("--amp", choices=AMP_MODES, default="none",
                   help="mixed precision: bf16, or fp16 with a loss scaler on CUDA (default: fp32 as the original)")
    p.add_argument("--fp16", action="store_true", help="the original's flag: same as --amp fp16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    _flag(p, "--stop-after-epochs", type=int, default=None,
          help="stop resumably after this many epochs (e.g. a job time limit); the schedule is unchanged")
    _flag(p, "--log-interval", type=int, default=50,
          help="micro-batches between TensorBoard scalars and, with --no-progress, log lines (default 50)")
    _flag(p, "--log-wandb", action="store_true", help="also log to Weights & Biases (needs the wandb package)")
    _flag(p, "--no-progress", action="store_true", help="no progress bars")


def register_task_command(subparsers: argparse._SubParsersAction, task: str, name: str, help: str,
                          example: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``lowformer NAME train|eval|predict`` for a dense task: the shared ``train`` parser, and ``eval`` /
    ``predict`` parsers carrying the flags every task's run functions take; the caller adds its own and
    their ``func``."""
    p = subparsers.add_parser(name, help=f"{help}: train, eval, predict", description=f"{help[0].upper()}{help[1:]}.")
    sub = p.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")
    t = sub.add_parser("train", help=f"train a {task} recipe (configs/{name}/*.yaml), resumable", allow_abbrev=False,
                       description=f"Train with a YAML recipe (task: {task}). Unknown '--a.b value' arguments "
                                   "override config keys, e.g. --data_provider.data_dir /data/set.")
    t.add_argument("config", help=f"recipe file, e.g. {example}")
    add_train_arguments(t)
    t.set_defaults(func=lambda args: run_recipe(args, task=task), accepts_overrides=True)

    run_help = f"run directory of `lowformer {name} train`"
    e = sub.add_parser("eval", help="score a run on a split (JSON)")
    e.add_argument("--run", required=True, help=run_help)
    e.add_argument("--data", required=True, help="dataset folder (composite, COCO, ADE20K or VOC layout)")
    e.add_argument("--split", default="val", help="split name: val, train, val2017 ... (default val)")
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    e.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")

    q = sub.add_parser("predict", help="draw a run's predictions on one image")
    q.add_argument("image", help="image file")
    q.add_argument("--run", required=True, help=run_help)
    q.add_argument("--out", required=True, help="output image, e.g. out.png")
    return e, q


def run(args: argparse.Namespace) -> int:
    return run_recipe(args)


def run_recipe(args: argparse.Namespace, task: str | None = None) -> int:
    """Train ``args.config``; with ``task``, the recipe must be of that task (``det train`` / ``seg train``)."""
    cfg = load_config(args.config, args.overrides)
    if task is not None and cfg.task != task:
        raise LowformerError(f"'{args.config}' is a {cfg.task} recipe; `lowformer {args.command} train` needs "
                             f"'task: {task}' (use `lowformer train` for classification recipes)")
    summary = train(cfg, args.path, resume=args.resume, seed=args.manual_seed, amp="fp16" if args.fp16 else args.amp,
                    device=args.device, stop_after_epochs=args.stop_after_epochs, progress=not args.no_progress,
                    allow_config_change=args.allow_config_change, initial_checkpoint=args.initial_checkpoint,
                    log_interval=args.log_interval, log_wandb=args.log_wandb)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        logging.getLogger(__name__).info("summary: %s", json.dumps(summary))
    return 0
