"""Accuracy cost of the deploy paths on a trained CIFAR-10 model (issue 8: int8 top-1 within a point of fp32,
cosine >= 0.99 on real images).

The checkpoint (e.g. ``evalmodel.pt`` from ``lowformer train configs/cls/cifar10/b0.yaml``) is evaluated with the
recipe's validation preprocessing (resize + center crop at ``--image-size``, crop ratio 1.0, bilinear, ImageNet
mean/std) by the eager fp32 model, the fp32 and bf16 deploy modules, the int8 ONNX Runtime module (static
quantization calibrated on ``--calibration-images`` training images drawn with a fixed seed), OpenVINO fp32 / bf16 /
NNCF int8 on the deploy export (same calibration images) and whatever ``precision="auto"`` picks. Per path: top-1 on
the validation folder, its delta to eager fp32, argmax agreement and logit cosine to eager fp32; and the cosine on
the imagenet-sample images at the same size (real photographs outside the training distribution), and the share
of images whose cosine reaches 0.99. int8 runs twice: with the default weights (7-bit on a CPU without VNNI) and
with full 8-bit weights, whose AVX2 kernels saturate. One thread.

    python benchmarks/deploy_accuracy_cifar10.py --checkpoint runs/c10/checkpoint/evalmodel.pt
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowformer  # noqa: E402
from lowformer.bench.timing import environment  # noqa: E402
from lowformer.data import ImageFolderDataset, eval_transform  # noqa: E402
from lowformer.deploy.onnx import deploy_int8  # noqa: E402
from lowformer.files import atomic_output  # noqa: E402

_logger = logging.getLogger("deploy_accuracy_cifar10")
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_folder(root: Path, transform, count: int | None = None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images and labels of a class-folder tree: all of them, or ``count`` drawn with ``seed``
    (the folder order is by class, so a prefix would hold a single class)."""
    dataset = ImageFolderDataset(root, transform=transform)
    indices = range(len(dataset))
    if count is not None:
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed or 0))[:count].tolist()
    samples = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples])


@torch.inference_mode()
def logits(module: torch.nn.Module, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    return torch.cat([module(b).float() for b in images.split(batch_size)])


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    return {"agreement": (out.argmax(1) == ref.argmax(1)).float().mean().item(),
            "mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(),
            "share_099": (cos >= 0.99).float().mean().item()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained CIFAR-10 weights (evalmodel.pt)")
    p.add_argument("--model", default="lowformer_b0")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=48, help="the recipe's eval_image_size")
    p.add_argument("--crop-ratio", type=float, default=1.0, help="the recipe's test_crop_ratio")
    p.add_argument("--interpolation", default="bilinear", help="the recipe's test_interpolate")
    p.add_argument("--val", type=Path, default=DATA / "cifar10" / "val")
    p.add_argument("--train", type=Path, default=DATA / "cifar10" / "train", help="calibration images come from here")
    p.add_argument("--real", type=Path, default=DATA / "imagenet-sample" / "val", help="real photographs for cosine")
    p.add_argument("--calibration-images", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model = lowformer.create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint).eval()
    transform = eval_transform(model, input_size=(3, args.image_size, args.image_size), crop_pct=args.crop_ratio,
                               interpolation=args.interpolation)
    val_x, val_y = load_folder(args.val, transform)
    real_x, _ = load_folder(args.real, transform)
    calibration, _ = load_folder(args.train, transform, args.calibration_images, seed=0)
    _logger.info("%d val, %d real, %d calibration images at %d px", len(val_x), len(real_x), len(calibration),
                 args.image_size)

    example = val_x[:1]
    paths = {
        "fp32 eager": model,
        "fp32 deploy": lowformer.deploy(model, example, precision="fp32"),
        "bf16 deploy": lowformer.deploy(model, example, precision="bf16", min_cosine=-1.0),
        "int8 onnxruntime": lowformer.deploy(model, example, precision="int8", calibration=calibration.split(16),
                                             min_cosine=-1.0),
        "int8 onnxruntime, 8-bit weights": deploy_int8(model, example, calibration.split(16), min_cosine=-1.0,
                                                       reduce_range=False),
        "fp32 openvino": lowformer.deploy(model, example, runtime="openvino", threads=args.threads),
        "bf16 openvino": lowformer.deploy(model, example, precision="bf16", runtime="openvino", min_cosine=-1.0,
                                          threads=args.threads),
        "int8 openvino": lowformer.deploy(model, example, precision="int8", runtime="openvino",
                                          calibration=calibration, min_cosine=-1.0, threads=args.threads),
    }
    # What a user gets from the gate: the fastest path on this CPU whose cosine on the calibration images passes.
    auto = lowformer.deploy(model, example, precision="auto", calibration=calibration, threads=args.threads)
    paths[f"auto: {auto.report['runtime']} {auto.report['precision']}"] = auto
    env = environment("cpu", args.threads)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    out = args.out or RESULTS / f"deploy_accuracy_cifar10_{stamp}.csv"
    fields = ["model", "path", "image_size", "val_images", "top1", "top1_delta", "val_agreement", "val_mean_cosine",
              "val_min_cosine", "val_share_cosine_099", "real_images", "real_agreement", "real_mean_cosine",
              "real_min_cosine", "real_share_cosine_099",
              "calibration_images", "checkpoint", "device", "torch", "threads", "load_avg_1m", "date"]
    ref_val, ref_real = logits(model, val_x), logits(model, real_x)
    ref_top1 = 100 * (ref_val.argmax(1) == val_y).float().mean().item()
    with atomic_output(out) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for name, module in paths.items():
            v = logits(module, val_x)
            top1 = 100 * (v.argmax(1) == val_y).float().mean().item()
            on_val, on_real = compare(v, ref_val), compare(logits(module, real_x), ref_real)
            writer.writerow({
                "model": args.model, "path": name, "image_size": args.image_size, "val_images": len(val_x),
                "top1": f"{top1:.2f}", "top1_delta": f"{top1 - ref_top1:+.2f}",
                "val_agreement": f"{on_val['agreement']:.4f}", "val_mean_cosine": f"{on_val['mean_cosine']:.5f}",
                "val_min_cosine": f"{on_val['min_cosine']:.5f}", "val_share_cosine_099": f"{on_val['share_099']:.4f}",
                "real_images": len(real_x), "real_share_cosine_099": f"{on_real['share_099']:.4f}",
                "real_agreement": f"{on_real['agreement']:.4f}", "real_mean_cosine": f"{on_real['mean_cosine']:.5f}",
                "real_min_cosine": f"{on_real['min_cosine']:.5f}",
                "calibration_images": len(calibration) if name.startswith(("int8", "auto")) else "",
                "checkpoint": Path(args.checkpoint).name, "device": env["device"], "torch": env["torch_version"],
                "threads": args.threads, "load_avg_1m": f"{os.getloadavg()[0]:.2f}",
                "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
            })
            f.flush()
            _logger.info("%-16s top-1 %.2f (%+.2f)  val: agreement %.4f cosine mean %.5f min %.5f  real: cosine mean "
                         "%.5f min %.5f", name, top1, top1 - ref_top1, on_val["agreement"], on_val["mean_cosine"],
                         on_val["min_cosine"], on_real["mean_cosine"], on_real["min_cosine"])
    _logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
