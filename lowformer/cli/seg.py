"""``lowformer seg train|eval|predict``: semantic segmentation with the shared trainer.

``seg train CONFIG --path RUN`` is ``lowformer train`` for a ``task: segmentation`` recipe
(configs/seg/*.yaml; ``--a.b value`` overrides config keys); ``seg eval --run RUN --data DIR --split S
--out FILE.json`` scores a run; ``seg predict IMAGE --run RUN --out overlay.png`` draws a colour overlay.
"""
from __future__ import annotations

import argparse
import json

from lowformer.cli.train import add_train_arguments, run_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("seg", help="semantic segmentation: train, eval, predict",
                              description="Semantic segmentation (Semantic FPN, UperNet, DeepLabv3, SegFormer heads).")
    sub = p.add_subparsers(dest="seg_command", required=True, metavar="SEG_COMMAND")

    t = sub.add_parser("train", help="train a segmentation recipe (configs/seg/*.yaml), resumable", allow_abbrev=False,
                       description="Train with a YAML recipe; unknown '--a.b value' arguments override config keys, "
                                   "e.g. --data_provider.data_dir ADE/ --segmentation.backbone_checkpoint cls.pt")
    t.add_argument("config", help="recipe file, e.g. configs/seg/composite/fpn_b0.yaml")
    add_train_arguments(t)
    t.set_defaults(func=_train, accepts_overrides=True)

    e = sub.add_parser("eval", help="score a run: mIoU, per-class IoU, pixel accuracy (JSON)")
    e.add_argument("--run", required=True, help="run directory of `lowformer seg train`")
    e.add_argument("--data", required=True, help="dataset root (ADE20K layout images/SPLIT + annotations/SPLIT, or VOC)")
    e.add_argument("--split", default="val", help="split name (default val)")
    e.add_argument("--out", default=None, help="write the scores as JSON here")
    e.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    e.set_defaults(func=_eval)

    q = sub.add_parser("predict", help="segment one image and write a colour overlay PNG")
    q.add_argument("image", help="image file")
    q.add_argument("--run", required=True, help="run directory of `lowformer seg train`")
    q.add_argument("--out", required=True, help="overlay PNG to write")
    q.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours (default 0.5)")
    q.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    q.set_defaults(func=_predict)


def _train(args: argparse.Namespace) -> int:
    import lowformer.segmentation.task  # noqa: F401  (registers the task and its config section)
    return run_recipe(args, task="segmentation")


def _eval(args: argparse.Namespace) -> int:
    from lowformer.segmentation.run import evaluate_run
    result = evaluate_run(args.run, args.data, args.split, args.out, device=args.device)
    print(json.dumps({k: result[k] for k in ("images", "miou", "pixel_acc")}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from lowformer.segmentation.run import predict_overlay
    labels = predict_overlay(args.run, args.image, args.out, alpha=args.alpha, device=args.device)
    print(f"wrote {args.out} ({labels.shape[1]}x{labels.shape[0]}, classes present: "
          f"{sorted(set(labels.ravel().tolist()))})")
    return 0
