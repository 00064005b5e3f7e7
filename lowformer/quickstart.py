"""The quick start's tour on bundled defaults (``lowformer quickstart``).

It prints the LowFormer model table, then builds LowFormer-B0, classifies the bundled real ImageNet image
with the model's own preprocessing, times batch-1 inference on this machine, and finally trains
LowFormer-B0 briefly on the bundled CIFAR-10 images (configs/cls/cifar10/b0.yaml at 32 px) and evaluates it."""
from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

import torch

from lowformer.bench.complexity import model_complexity
from lowformer.bench.timing import environment, time_callable
from lowformer.checkpoints import CheckpointError, find_pretrained_file
from lowformer.data import bundled_image, eval_transform, load_image
from lowformer.errors import LowformerError
from lowformer.hub import imagenet_class_names
from lowformer.models import LOWFORMER_MODELS, create_model

__all__ = ["quickstart", "format_model_table"]


def format_model_table(rows: list[dict]) -> str:
    """``model_complexity`` records as a fixed-width table: params, MACs, resolution, and mmcv's "FLOPs"
    (the seeds' convention) when a record has them (detectors, segmenters)."""
    mmcv = any("mmcv_flops" in r for r in rows)
    lines = [f"{'model':<32} {'params (M)':>10} {'MACs (M)':>10} {'resolution':>10}"
             + (f" {'mmcv FLOPs (M)':>15}" if mmcv else "")]
    for r in rows:
        extra = f" {r['mmcv_flops'] / 1e6:>15.1f}" if r.get("mmcv_flops") is not None else ""
        lines.append(f"{r['model']:<32} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e6:>10.1f} "
                     f"{r.get('image_width', r['image_size']):>6}x{r['image_size']:<3}" + extra)
    return "\n".join(lines)


def quickstart(model_name: str = "lowformer_b0", threads: int = 1, train_epochs: int = 3,
               train_path: str | None = None) -> None:
    """Print the tour: model table, a prediction on the bundled image, batch-1 latency, a short training.

    Only the local weights folder is used for ``model_name`` (random weights otherwise), so the tour
    never needs the network."""
    if threads <= 0 or train_epochs < 0:
        raise LowformerError(f"threads must be positive and train epochs >= 0, got {threads} and {train_epochs}")
    print("== LowFormer models (params, MACs in the papers' convention)")
    print(format_model_table([model_complexity(n) for n in LOWFORMER_MODELS]))

    try:
        weights = find_pretrained_file(model_name)
        model = create_model(model_name, checkpoint_path=weights)
        source = f"weights from {weights}"
    except CheckpointError:
        model = create_model(model_name)
        source = "random weights (put released weights in the weights folder for real predictions)"
    model.eval()
    image = load_image(bundled_image())
    x = eval_transform(model)(image).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    names = imagenet_class_names()
    top = probs.topk(3)
    print(f"\n== {model_name} on {bundled_image().name} (true class: tench), {source}")
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {p:6.2%}  {i:4d} {names[i]}")

    env = environment("cpu", threads)
    with torch.inference_mode():
        t = time_callable(lambda: model(x), threads=threads)
    print(f"\n== batch-1 latency, eager PyTorch, {tuple(x.shape[1:])}: median {t['median_ms']:.1f} ms, "
          f"min {t['min_ms']:.1f} ms ({t['samples']} samples)")
    print(f"   device: {env['device']}, torch {env['torch_version']}, threads {env['threads']}, "
          f"load average {env['load_avg_1m']:.2f}")
    if train_epochs > 0:
        _train_demo(train_epochs, train_path)


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
