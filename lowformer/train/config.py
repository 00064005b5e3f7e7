"""Training recipes: YAML files merged as the original does, validated into frozen dataclasses.

A config path P is merged from every ``default.yaml`` between the configs root and P's folder
(outermost first), then P, then ``--a.b value`` overrides. Unlike the original, the path is resolved
first and the walk stops at the configs root (never the working directory), YAML follows 1.2 for
numbers (``1e-3`` is a float), and an unknown key or a value of the wrong type is a LowformerError
naming its dotted path and the nearest valid key. Derived values (peak learning rate, global batch)
are computed by functions, never written back into the config.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from lowformer.errors import LowformerError

__all__ = [
    "ConfigError", "TrainConfig", "DataProviderConfig", "RunConfig", "load_config", "parse_overrides",
    "merge", "resolve_config_path", "config_to_dict", "peak_lr", "global_batch_size", "packaged_configs_root",
]


class ConfigError(LowformerError, ValueError):
    """A config file, key or value that cannot be used."""


@dataclass(frozen=True)
class RRCConfig:
    train_interpolate: str = "random"
    test_interpolate: str = "bicubic"
    test_crop_ratio: float = 1.0
    scale: tuple[float, float] = (0.08, 1.0)  # ours: RandomResizedCrop area range (the original's fixed value)


@dataclass(frozen=True)
class AugConfig:
    """One ``data_aug`` entry: ``randaug`` (n ops, magnitude m) or ``erase`` (probability p)."""
    name: str
    n: int = 1
    m: float = 3.0
    p: float = 0.0


@dataclass(frozen=True)
class DataProviderConfig:
    dataset: str = "imagenet"
    data_dir: str = ""
    rrc_config: RRCConfig = field(default_factory=RRCConfig)
    data_aug: tuple[AugConfig, ...] = ()
    base_batch_size: int = 128
    test_batch_size: Union[int, None] = None
    valid_size: None = None
    n_worker: int = 8
    image_size: tuple[int, ...] = (128, 160, 192, 224)
    drop_last: bool = True
    hflip: float = 0.5  # ours: horizontal flip probability (the original's fixed 0.5)


@dataclass(frozen=True)
class MixupConfig:
    op: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class MesaConfig:
    thresh: float = 0.25
    ratio: float = 2.0


@dataclass(frozen=True)
class RunConfig:
    n_epochs: int = 300
    base_lr: float = 0.00025
    warmup_epochs: int = 20
    warmup_lr: float = 0.0
    lr_schedule_name: str = "cosine"
    lr_schedule_param: dict = field(default_factory=dict)
    optimizer_name: str = "adamw"
    optimizer_params: dict = field(default_factory=dict)
    weight_decay: float = 0.1
    no_wd_keys: tuple[str, ...] = ("norm", "bias")
    grad_clip: Union[float, None] = 2.0
    reset_bn: bool = True
    reset_bn_size: int = 16000
    reset_bn_batch_size: int = 100
    eval_image_size: tuple[int, ...] = (224,)
    label_smooth: float = 0.1
    mixup_config: Union[MixupConfig, None] = None
    bce: bool = True
    mesa: Union[MesaConfig, None] = None
    bsizemult: int = 1
    no_eval: bool = False


@dataclass(frozen=True)
class BackboneDropConfig:
    name: str = "droppath"
    drop_prob: float = 0.0
    linear_decay: bool = True
    skip: int = 0


@dataclass(frozen=True)
class NetConfig:
    name: str = "lowformer_b1"
    dropout: float = 0.0
    kwargs: dict = field(default_factory=dict)  # ours: extra model arguments for timm.create_model


@dataclass(frozen=True)
class TrainConfig:
    data_provider: DataProviderConfig = field(default_factory=DataProviderConfig)
    run_config: RunConfig = field(default_factory=RunConfig)
    backbone_drop: BackboneDropConfig = field(default_factory=BackboneDropConfig)
    net_config: NetConfig = field(default_factory=NetConfig)
    ema_decay: float = 0.9998


# --- YAML ------------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """Safe loader with YAML 1.2 floats (``1e-3``, ``2E5``) and the original's ``python/tuple`` tag."""


_FLOAT_12 = re.compile(r"""^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$
                         |^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*$|^[-+]?\.[0-9_]+$
                         |^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$""", re.X)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None


# --- files and merging -----------------------------------------------------------------------------------

def packaged_configs_root() -> Path:
    """The recipes shipped inside the package (the repository's ``configs/`` links here)."""
    return Path(str(resources.files("lowformer") / "configs"))


def resolve_config_path(path: str | Path) -> Path:
    """An existing file as given, else the same relative path inside the packaged recipes, so that
    ``configs/cls/imagenet/b1.yaml`` works from the clone and from anywhere after ``pip install``."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    parts = p.parts[1:] if p.parts and p.parts[0] == "configs" else p.parts
    packaged = packaged_configs_root().joinpath(*parts) if parts and not p.is_absolute() else None
    if packaged is not None and packaged.is_file():
        return packaged.resolve()
    shipped = sorted(str(q.relative_to(packaged_configs_root().parent)) for q in packaged_configs_root().rglob("*.yaml")
                     if q.name != "default.yaml")
    raise ConfigError(f"config '{path}' not found; shipped recipes: {', '.join(shipped)}")


def _configs_root(path: Path) -> Path:
    """The nearest ancestor folder named ``configs``, else the config's own folder."""
    for parent in path.parents:
        if parent.name == "configs":
            return parent
    return path.parent


def _default_files(path: Path) -> list[Path]:
    root = _configs_root(path)
    folders = [path.parent]
    while folders[-1] != root and folders[-1] != folders[-1].parent:
        folders.append(folders[-1].parent)
    return [f / "default.yaml" for f in reversed(folders) if (f / "default.yaml").is_file() and f / "default.yaml" != path]


def merge(base: dict, update: dict) -> dict:
    """Recursive dict update as the original does it: dicts merge key by key, anything else (lists
    included) replaces the previous value."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(tokens: list[str]) -> dict:
    """``["--a.b", "v", "--c=w"]`` -> ``{"a": {"b": v}, "c": w}`` with each value parsed as YAML.

    Raises ConfigError for a token that is not a ``--key`` or a key without a value."""
    out: dict = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument '{token}': config overrides are '--a.b value' pairs")
        if "=" in token:
            key, raw = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"override '{token}' has no value")
            key, raw = token[2:], tokens[i + 1]
            i += 2
        if "{" in raw and ":" in raw:
            raw = re.sub(r":(?=\S)", ": ", raw)
        value = _yaml_load(raw, f"override --{key}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '--{key}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Load a recipe: default.yaml files from the configs root down to P's folder, P, then overrides."""
    path = resolve_config_path(path)
    merged: dict = {}
    for source in [*_default_files(path), path]:
        data = _yaml_load(source.read_text(), str(source)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of config groups")
        merged = merge(merged, data)
    if overrides:
        merged = merge(merged, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return _build(TrainConfig, merged, "")


# --- validation ------------------------------------------------------------------------------------------

def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        sub = _dataclass_in(typing.get_type_hints(cls)[f.name])
        if sub is not None and sub is not AugConfig:
            keys += _all_keys(sub, name + ".")
    return keys


def _dataclass_in(tp: Any) -> type | None:
    for t in (typing.get_args(tp) or (tp,)):
        if dataclasses.is_dataclass(t):
            return t
        if typing.get_origin(t) is tuple:
            inner = _dataclass_in(typing.get_args(t)[0])
            if inner is not None:
                return inner
    return None


def _unknown_key(path: str) -> ConfigError:
    close = difflib.get_close_matches(path, _all_keys(TrainConfig), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{path}'{hint}")


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{path.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(f"{path}{key}")
    return cls(**{k: _convert(hints[k], v, f"{path}{k}") for k, v in data.items()})


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{path}': only null is supported, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    if path.endswith("data_aug"):
        items = [] if value is None else value if isinstance(value, list) else [value]
        return tuple(_aug(item, f"{path}[{i}]") for i, item in enumerate(items))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if path.endswith("image_size"):
            return tuple(sorted(_convert(int, v, path) for v in value))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, path) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{path}': expected {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, path) for a, v in zip(args, value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}': expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                raise ConfigError(f"config key '{path}': expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and value != int(value)):
            raise ConfigError(f"config key '{path}': expected {'an integer' if tp is int else 'a number'}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{path}': expected a string, got {value!r}")
        return str(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}': expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"config key '{path}': unsupported type {tp}")


def _aug(item: Any, path: str) -> AugConfig:
    aug = _build(AugConfig, item, path + ".")
    if aug.name not in ("randaug", "erase"):
        raise ConfigError(f"config key '{path}.name': unknown augmentation '{aug.name}' (use randaug or erase)")
    return aug


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain YAML-ready dict (tuples as lists) of a config, as written to ``RUN_DIR/config.yaml``."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


# --- derived values --------------------------------------------------------------------------------------

def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """The original's peak learning rate: ``base_lr x bsizemult x world size`` (gradients of the
    bsizemult micro-batches are summed, so the per-sample rate is ``base_lr / base_batch_size``)."""
    return cfg.run_config.base_lr * cfg.run_config.bsizemult * world_size


def global_batch_size(cfg: TrainConfig, world_size: int) -> int:
    return cfg.data_provider.base_batch_size * cfg.run_config.bsizemult * world_size


def warmup_and_total_steps(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, int]:
    """Scheduler steps (micro-batches) of the warm-up and of the cosine part after it."""
    return cfg.run_config.warmup_epochs * batches_per_epoch, max(1, cfg.run_config.n_epochs * batches_per_epoch)


def total_epochs(cfg: TrainConfig) -> int:
    """Epochs run: ``n_epochs`` count after the warm-up, as in the original (300 + 20 = 320)."""
    return cfg.run_config.n_epochs + cfg.run_config.warmup_epochs

