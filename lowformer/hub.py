"""Trained runs as timm models, and timm's Hugging Face folder format.

``load_run(RUN_DIR)`` rebuilds the network of a training run with its best EMA weights, and puts the run's
evaluation preprocessing (input size, crop, interpolation, mean/std) and class names into the model's
``pretrained_cfg``, so that everything that follows the model's cfg (``eval_transform``, ``imagenet_eval``,
``save_pretrained``) uses the recipe instead of the architecture's ImageNet defaults.

``save_pretrained(model_or_run, DIR)`` writes ``config.json`` + ``model.safetensors`` through timm's own
``save_for_hf``, so ``timm.create_model("local-dir:DIR", pretrained=True)`` (and ``hf-hub:`` after an
upload) rebuilds the model with the same outputs and the recipe's preprocessing.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from lowformer.errors import LowformerError

__all__ = ["RunRecipe", "read_run", "load_run", "save_pretrained", "class_names", "imagenet_class_names"]

# Which weights of a run directory are its result, best first.
_RUN_WEIGHTS = ("evalmodel.pt", "evalmodel_final.pt")
_DATA_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std")


@dataclass(frozen=True)
class RunRecipe:
    """What a run directory says about its model: architecture, classes, evaluation preprocessing."""

    run_dir: Path
    model: str
    model_kwargs: dict[str, Any]
    data_dir: Path
    classes: tuple[str, ...] | None
    image_size: int
    crop_pct: float
    interpolation: str
    weights: Path | None

    def data_config(self) -> dict[str, Any]:
        """timm's data config of the run's validation transform."""
        return {"input_size": (3, self.image_size, self.image_size), "crop_pct": self.crop_pct,
                "crop_mode": "center", "interpolation": self.interpolation,
                "mean": tuple(IMAGENET_DEFAULT_MEAN), "std": tuple(IMAGENET_DEFAULT_STD)}


def read_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> RunRecipe:
    """Read ``RUN_DIR/config.yaml`` (written by ``lowformer train``). Classes are the sorted class folders
    of the run's ``data_dir/train`` (the trainer's class order), or of ``data_dir`` when given and the
    run's folder is gone. Raises LowformerError naming what is missing."""
    run = Path(run_dir).expanduser()
    config_file = run / "config.yaml"
    if not run.is_dir():
        raise LowformerError(f"run directory '{run}' not found")
    if not config_file.is_file():
        raise LowformerError(f"'{run}' is not a run directory: it has no config.yaml (written by `lowformer train`)")
    try:
        cfg = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LowformerError(f"'{config_file}' is not readable YAML ({str(e).splitlines()[0]})") from None
    net, dp, rc = cfg.get("net_config") or {}, cfg.get("data_provider") or {}, cfg.get("run_config") or {}
    rrc = dp.get("rrc_config") or {}
    if not net.get("name"):
        raise LowformerError(f"'{config_file}' names no model (net_config.name)")
    sizes = rc.get("eval_image_size") or [224]
    run_data = Path(dp.get("data_dir") or "").expanduser()
    classes = _folder_classes(run_data / "train") or _folder_classes(run_data / "val")
    if classes is None and data_dir is not None:
        classes = _folder_classes(Path(data_dir))
    kwargs = dict(net.get("kwargs") or {})
    weights = next((run / "checkpoint" / w for w in _RUN_WEIGHTS if (run / "checkpoint" / w).is_file()), None)
    return RunRecipe(run_dir=run, model=net["name"], model_kwargs=kwargs, data_dir=run_data, classes=classes,
                     image_size=int(sizes[-1]), crop_pct=float(rrc.get("test_crop_ratio", 1.0)),
                     interpolation=str(rrc.get("test_interpolate", "bicubic")), weights=weights)


def _folder_classes(folder: Path) -> tuple[str, ...] | None:
    if not folder.is_dir():
        return None
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    return tuple(names) or None


def load_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
             data_dir: str | os.PathLike | None = None) -> nn.Module:
    """The run's model with its best EMA weights (``checkpoint/evalmodel.pt``, else ``evalmodel_final.pt``)
    or ``checkpoint``, in eval mode, its ``pretrained_cfg`` carrying the recipe's preprocessing and the
    class names as ``label_names``."""
    from lowformer.models import create_model
    recipe = read_run(run_dir, data_dir)
    weights = Path(checkpoint) if checkpoint is not None else recipe.weights
    if weights is None:
        raise LowformerError(f"run '{recipe.run_dir}' has no evalmodel.pt yet (it is written after the first "
                             "validated epoch); pass --checkpoint FILE")
    if recipe.classes is None:
        raise LowformerError(f"run '{recipe.run_dir}': its data folder '{recipe.data_dir}' is gone, so its classes "
                             "are unknown; pass the image folder (--data DIR) to take them from its sub-folders")
    model = create_model(recipe.model, checkpoint_path=weights, num_classes=len(recipe.classes),
                         **recipe.model_kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, **recipe.data_config(), "num_classes": len(recipe.classes),
                            "label_names": list(recipe.classes)}
    return model.eval()


def save_pretrained(model_or_run: nn.Module | str | os.PathLike, out_dir: str | os.PathLike,
                    checkpoint: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir/config.json`` (timm's pretrained_cfg with the model's preprocessing, num_classes and
    label names) and ``out_dir/model.safetensors`` for ``timm.create_model("local-dir:OUT_DIR",
    pretrained=True)``.

    ``model_or_run`` is a model (its ``pretrained_cfg`` says the preprocessing) or a run directory
    (:func:`load_run`). The folder is written under a temporary name beside ``out_dir`` and renamed, so an
    existing folder is never half-replaced; a non-empty ``out_dir`` is refused."""
    from timm.models import save_for_hf
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LowformerError(f"--out '{out}' already exists and is not an empty folder; choose a new folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowformerError(f"--out '{out}': cannot create its parent folder ({e.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise LowformerError(f"--out '{out}': its parent folder '{out.parent}' is not writable")
    model = model_or_run if isinstance(model_or_run, nn.Module) else load_run(model_or_run, checkpoint)
    cfg = model.pretrained_cfg
    data_config = {k: cfg[k] for k in _DATA_KEYS if cfg.get(k) is not None}
    labels = cfg.get("label_names")
    model_config = {"label_names": list(labels)} if labels and len(labels) == model.num_classes else {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True, data_config=data_config)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (the bundled ``imagenet_classes.tsv``)."""
    text = (resources.files("lowformer") / "assets" / "imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return [name for _, _, name in sorted(rows, key=lambda r: int(r[0]))]


def class_names(model: nn.Module) -> list[str]:
    """Names of the model's output classes: its cfg's ``label_names`` (a run, an exported folder), the
    ImageNet names for a 1000-class model, else ``class 0``, ``class 1``..."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    labels = cfg.get("label_names")
    n = getattr(model, "num_classes", None) or len(labels or ())
    if labels and len(labels) == n:
        return list(labels.values()) if isinstance(labels, dict) else list(labels)
    if n == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(n)]
