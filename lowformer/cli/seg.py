"""``lowformer seg train|eval|predict``: semantic segmentation with the shared trainer.

``seg train CONFIG --path RUN`` is ``lowformer train`` for a ``task: segmentation`` recipe
(configs/seg/*.yaml; ``--a.b value`` overrides config keys); ``seg eval --run RUN --data DIR --split S
--out FILE.json`` scores a run (mIoU, per-class IoU, pixel accuracy); ``seg predict IMAGE --run RUN --out
overlay.png`` draws a colour overlay.
"""
from __future__ import annotations

import argparse
import json

from lowformer.cli.train import register_task_command


def register(subparsers: argparse._SubParsersAction) -> None:
    e, q = register_task_command(subparsers, "segmentation", "seg",
                                 "semantic segmentation (Semantic FPN, UperNet, DeepLabv3, SegFormer heads)",
                                 "configs/seg/composite/fpn_b0.yaml")
    e.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also score each mirror image and average (default: the recipe's segmentation.test_flip)")
    e.set_defaults(func=_eval)
    q.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours (default 0.5)")
    q.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    q.set_defaults(func=_predict)


def _eval(args: argparse.Namespace) -> int:
    from lowformer.segmentation.run import evaluate_run
    result = evaluate_run(args.run, args.data, args.split, args.out, device=args.device, flip=args.flip)
    print(json.dumps({k: result[k] for k in ("images", "miou", "pixel_acc")}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from lowformer.segmentation.run import predict_overlay
    labels = predict_overlay(args.run, args.image, args.out, alpha=args.alpha, device=args.device)
    print(f"wrote {args.out} ({labels.shape[1]}x{labels.shape[0]}, classes present: "
          f"{sorted(set(labels.ravel().tolist()))})")
    return 0
