"""``lowformer det train|eval|predict``: detection and instance segmentation runs."""
from __future__ import annotations

import argparse
import json

from lowformer.cli.train import register_task_command


def register(subparsers: argparse._SubParsersAction) -> None:
    e, r = register_task_command(subparsers, "detection", "det", "object detection / instance segmentation",
                                 "configs/det/composite_retinanet_b0.yaml")
    e.add_argument("--weights", default="evalmodel.pt", help="file in RUN/checkpoint (default evalmodel.pt)")
    e.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    e.set_defaults(func=_eval)

    r.add_argument("--score", type=float, default=0.3, help="minimum score drawn (default 0.3)")
    r.add_argument("--weights", default="evalmodel.pt")
    r.set_defaults(func=_predict)


def _eval(args: argparse.Namespace) -> int:
    from lowformer.detection.run import evaluate_run, format_table
    metrics = evaluate_run(args.run, args.data, args.split, args.out, args.weights, args.batch_size, args.device)
    print(format_table(metrics))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from lowformer.detection.run import predict_image
    dets = predict_image(args.run, args.image, args.out, args.score, args.weights)
    print(json.dumps({"image": args.image, "out": args.out, "detections": dets}))
    return 0
