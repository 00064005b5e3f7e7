"""Params and MACs of the detection presets beside the seeds' figures (the README table), and what a Cascade
Mask R-CNN would add to the nearest preset.

Counted as ``lowformer models`` counts ``ARCH:BACKBONE`` (80 classes, 1280x800 unless noted): the project's
MACs (convs, linears, attention matmuls) and mmcv's get_flops "FLOPs" (convs with bias, linears, norms,
ReLUs, pooling; no attention matmuls), both over mmdet's ``forward_dummy`` pass (backbone, neck, dense heads;
R-CNN box head on 1000 RoIs and mask head on 100). The Cascade extra is two more 4conv1fc box stages
(1000 RoIs each) and two more mask heads (100 RoIs each), mmdet's cascade_mask_rcnn layout, priced with
torchvision's modules of those shapes.
    PYTHONPATH=. python benchmarks/detection_sizes.py [--json FILE]
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from lowformer.bench.complexity import count_costs, count_params, model_complexity

# (spec, size (h, w) or None for 1280x800, seed's figure)
PRESETS = [
    ("mask_rcnn:visformer_small_v2", None, "VisformerV2-S Mask R-CNN 1x: 43M / 262G"),
    ("mask_rcnn:visformer_small", None, "Visformer-S Mask R-CNN 1x: 60M / 275G"),
    ("faster_rcnn:visformer_small_v2", None, "-"),
    ("mask_rcnn:dwnet_tiny", None, "DWNet-T Cascade Mask R-CNN 3x: 82M / 730G (nearest preset)"),
    ("retinanet:lowformer_b0", None, "- (not in the paper's repository)"),
    ("retinanet:lowformer_b1", None, "-"),
    ("fcos:lowformer_b1", None, "-"),
    ("ssdlite:edgeformer_s", 320, "EdgeFormer-S SSD 320x320: 5.2M / -"),
]


class _Stage(nn.Module):
    """One more Cascade stage: a 4conv1fc box head + predictor on 1000 RoIs, a mask head on 100."""

    def __init__(self, classes: int = 81) -> None:
        super().__init__()
        self.box = nn.Sequential(FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d),
                                 FastRCNNPredictor(1024, classes))
        self.mask = nn.Sequential(MaskRCNNHeads(256, [256] * 4, 1), MaskRCNNPredictor(256, 256, classes))

    def forward(self, x: torch.Tensor) -> tuple:
        return self.box(x[:1, :, :7, :7].expand(1000, -1, -1, -1).contiguous()), self.mask(x[:100])


def cascade_extra(stages: int = 2) -> dict:
    stage = _Stage()
    macs, mmcv = count_costs(stage, (256, 14, 14), batch_size=100)
    return {"params_m": stages * count_params(stage) / 1e6, "gmacs": stages * macs / 1e9,
            "mmcv_gflops": stages * mmcv / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for spec, size, seed in PRESETS:
        torch.manual_seed(0)
        r = model_complexity(spec, image_size=size)
        rows.append({"spec": spec, "input": f"{r['image_width']}x{r['image_size']}", "params_m": r["params"] / 1e6,
                     "gmacs": r["macs"] / 1e9, "mmcv_gflops": r["mmcv_flops"] / 1e9, "seed": seed})
        print(f"| `{spec}` | {rows[-1]['input']} | {rows[-1]['params_m']:.1f}M | {rows[-1]['gmacs']:.1f}G | "
              f"{rows[-1]['mmcv_gflops']:.1f}G | {seed} |", flush=True)
    extra = cascade_extra()
    print(f"Cascade extra (2 stages of 4conv1fc box head + mask head): {extra['params_m']:.1f}M, "
          f"{extra['gmacs']:.1f}G MACs, {extra['mmcv_gflops']:.1f}G mmcv")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"presets": rows, "cascade_extra": extra}, f, indent=1)


if __name__ == "__main__":
    main()
