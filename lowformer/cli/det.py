"""``lowformer det train|eval|predict``: detection and instance segmentation runs."""
from __future__ import annotations

import argparse
import json

from lowformer.cli.train import add_train_arguments, run_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("det", help="object detection / instance segmentation: train, eval, predict")
    sub = p.add_subparsers(dest="det_command", required=True, metavar="ACTION")

    t = sub.add_parser("train", help="train a detection recipe (configs/det/*.yaml) with the project's trainer",
                       description="Train with a YAML recipe (task: detection). Unknown '--a.b value' arguments "
                                   "override config keys, e.g. --data_provider.data_dir /data/coco.")
    t.add_argument("config", help="recipe, e.g. configs/det/composite_retinanet_b0.yaml")
    add_train_arguments(t)
    t.set_defaults(func=_train, accepts_overrides=True)

    e = sub.add_parser("eval", help="COCO mAP of a run on a split (JSON and a per-class table)")
    e.add_argument("--run", required=True, help="run directory of `lowformer det train`")
    e.add_argument("--data", required=True, help="dataset folder (composite or COCO layout)")
    e.add_argument("--split", default="val", help="split name: val, train, val2017 ... (default val)")
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    e.add_argument("--weights", default="evalmodel.pt", help="file in RUN/checkpoint (default evalmodel.pt)")
    e.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_eval)

    r = sub.add_parser("predict", help="draw a run's detections (boxes, masks) on an image")
    r.add_argument("image")
    r.add_argument("--run", required=True, help="run directory of `lowformer det train`")
    r.add_argument("--out", required=True, help="output image, e.g. boxes.png")
    r.add_argument("--score", type=float, default=0.3, help="minimum score drawn (default 0.3)")
    r.add_argument("--weights", default="evalmodel.pt")
    r.set_defaults(func=_predict)


def _train(args: argparse.Namespace) -> int:
    import lowformer.detection.task  # noqa: F401  (registers the task and its config section)
    return run_recipe(args, task="detection")


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
