"""Params and MACs of the segmentation presets beside the published figures (the README table).

MACs at 2048x512 (mmseg's convention for ADE20K; the DWNet paper's 928G is this count for UperNet + DWNet-T)
and at 512x512 for VOC, counted as ``lowformer models`` counts them (convolutions, linears, attention
matmuls). Params include UperNet's auxiliary FCN head, as mmseg's counter does.
    PYTHONPATH=. python benchmarks/segmentation_sizes.py [--json FILE]
"""
from __future__ import annotations

import argparse
import json

import torch

from lowformer.bench.complexity import count_macs, count_params
from lowformer.errors import LowformerError
from lowformer.segmentation import create_segmenter

# (arch, backbone, classes, (h, w), published params M, published GMACs)
PRESETS = [
    ("upernet", "dwnet_tiny", 150, (512, 2048), 56, 928),
    ("upernet", "dwnet_base", 150, (512, 2048), 108, 1129),
    ("upernet", "dynamic_dwnet_tiny", 150, (512, 2048), 83, 928),
    ("upernet", "dynamic_dwnet_base", 150, (512, 2048), 195, 1129),
    ("deeplabv3", "edgeformer_s", 21, (512, 512), 5.8, None),
    ("semantic_fpn", "lowformer_b0", 150, (512, 2048), None, None),
    ("semantic_fpn", "lowformer_b1", 150, (512, 2048), None, None),
    ("semantic_fpn", "lowformer_b3", 150, (512, 2048), None, None),
    ("segformer", "lowformer_b0", 150, (512, 2048), None, None),
]


def measure(arch: str, backbone: str, classes: int, size: tuple[int, int]) -> dict:
    torch.manual_seed(0)
    model = create_segmenter(arch, backbone, classes)
    return {"arch": arch, "backbone": backbone, "classes": classes, "input": f"{size[1]}x{size[0]}",
            "params_m": count_params(model) / 1e6,
            "params_no_aux_m": (count_params(model) - (count_params(model.aux_head) if model.aux_head else 0)) / 1e6,
            "gmacs": count_macs(model, (3, *size)) / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for arch, backbone, classes, size, pub_p, pub_f in PRESETS:
        try:
            r = measure(arch, backbone, classes, size)
        except LowformerError as e:  # a preset that cannot be built yet is reported, not hidden
            r = {"arch": arch, "backbone": backbone, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        r.update(published_params_m=pub_p, published_gmacs=pub_f)
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
