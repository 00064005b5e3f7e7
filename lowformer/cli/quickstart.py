"""``lowformer quickstart``: the main job on bundled defaults, a tour of what the project does.

It prints the LowFormer model table, then builds LowFormer-B0, classifies the bundled real ImageNet image
with the model's own preprocessing, times batch-1 inference on this machine, and finally trains
LowFormer-B0 briefly on the bundled CIFAR-10 images (configs/cls/cifar10/b0.yaml at 32 px) and evaluates it."""
from __future__ import annotations

import argparse
import tempfile
from importlib import resources
from pathlib import Path

import torch

from lowformer.bench.complexity import model_complexity
from lowformer.bench.timing import environment, time_callable
from lowformer.checkpoints import CheckpointError, find_pretrained_file
from lowformer.cli._args import nonnegative_int, positive_int
from lowformer.cli.models import format_table
from lowformer.data import bundled_image, eval_transform, load_image
from lowformer.hub import imagenet_class_names
from lowformer.models import LOWFORMER_MODELS, create_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quickstart", help="tour on bundled defaults: model table, inference, timing")
    p.add_argument("--model", default="lowformer_b0", help="model to run on the bundled image")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads for the timing")
    p.add_argument("--train-epochs", type=nonnegative_int, default=3,
                   help="epochs of the bundled-CIFAR-10 training demo (0 skips it)")
    p.add_argument("--train-path", default=None, help="keep the demo's run directory here (default: a temporary one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("== LowFormer models (params, MACs in the papers' convention)")
    print(format_table([model_complexity(n) for n in LOWFORMER_MODELS]))

    try:
        weights = find_pretrained_file(args.model)
        model = create_model(args.model, checkpoint_path=weights)
        source = f"weights from {weights}"
    except CheckpointError:
        model = create_model(args.model)
        source = "random weights (put released weights in the weights folder for real predictions)"
    model.eval()
    image = load_image(bundled_image())
    x = eval_transform(model)(image).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    names = imagenet_class_names()
    top = probs.topk(3)
    print(f"\n== {args.model} on {bundled_image().name} (true class: tench), {source}")
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {p:6.2%}  {i:4d} {names[i]}")

    env = environment("cpu", args.threads)
    with torch.inference_mode():
        t = time_callable(lambda: model(x), threads=args.threads)
    print(f"\n== batch-1 latency, eager PyTorch, {tuple(x.shape[1:])}: median {t['median_ms']:.1f} ms, "
          f"min {t['min_ms']:.1f} ms ({t['samples']} samples)")
    print(f"   device: {env['device']}, torch {env['torch_version']}, threads {env['threads']}, "
          f"load average {env['load_avg_1m']:.2f}")
    if args.train_epochs > 0:
        _train_demo(args.train_epochs, args.train_path)
    return 0


def _train_demo(epochs: int, path: str | None) -> None:
    """Train LowFormer-B0 from scratch on the 300 bundled CIFAR-10 training images, evaluate on the 100
    bundled validation images (chance: 10%)."""
    from lowformer.train import load_config, train
    data = Path(str(resources.files("lowformer") / "assets" / "cifar10-mini"))
    cfg = load_config("configs/cls/cifar10/b0.yaml", {
        "data_provider": {"data_dir": str(data), "image_size": [32], "base_batch_size": 30, "n_worker": 0},
        "run_config": {"n_epochs": epochs, "eval_image_size": [32], "base_lr": 1.0e-3, "reset_bn_size": 300},
    })
    print(f"\n== training lowformer_b0 from scratch on {data.name} (300 real CIFAR-10 images, 10 classes, 32 px), "
          f"{epochs} epochs, configs/cls/cifar10/b0.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(cfg, path or tmp, device="cpu")
    print(f"   validation top-1 {summary['final_top1']:.1f}% on the 100 bundled validation images (chance 10%), "
          f"{summary['images_per_s']:.1f} training images/s, {summary['wall_s']:.0f} s")
