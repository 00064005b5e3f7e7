"""Training recipes: YAML files merged as the original does, validated into frozen dataclasses.

A config path P is merged from every ``default.yaml`` between the configs root and P's folder
(outermost first), then P, then ``--a.b value`` overrides. Unlike the original, the path is resolved
first and the walk stops at the configs root (never the working directory), YAML follows 1.2 for
numbers (``1e-3`` is a float), and an unknown key or a value of the wrong type is a LowformerError
naming its dotted path and the nearest valid key. Ranges live beside the fields (``metadata``) and
are checked while the file is read, so a bad value fails before any work; 0 is a value, never "unset".
Derived values (peak learning rate, global batch) are computed by functions, never written back.

One schema serves every task: the shared groups below, plus task sections (e.g. ``detection:``) that a
task registers with :func:`register_section` and reads with :meth:`TrainConfig.section`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import import_module, resources
from pathlib import Path
from typing import Any, Union

import yaml

from lowformer.errors import LowformerError

__all__ = [
    "ConfigError", "TrainConfig", "DataProviderConfig", "RunConfig", "load_config", "parse_overrides",
    "merge", "resolve_config_path", "config_to_dict", "peak_lr", "global_batch_size", "packaged_configs_root",
    "register_section", "import_builtin_task", "config_from_dict", "validate", "total_epochs",
]


class ConfigError(LowformerError, ValueError):
    """A config file, key or value that cannot be used."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           nonempty: bool = False, sort: bool = False) -> dict:
    """Field metadata: the allowed range of a number (or of each item of a tuple)."""
    return {"range": (lo, hi, lo_open, hi_open), "nonempty": nonempty, "sort": sort}


def _choices(*values: str) -> dict:
    """Field metadata: the values a string may take (the ones the code implements)."""
    return {"choices": values}


_POS = _range(1)
_NONNEG = _range(0)
_PROB = _range(0, 1)


@dataclass(frozen=True)
class RRCConfig:
    train_interpolate: str = "random"
    test_interpolate: str = "bicubic"
    test_crop_ratio: float = field(default=1.0, metadata=_range(0, 1, lo_open=True))
    # ours: RandomResizedCrop area range (the original's fixed value)
    scale: tuple[float, float] = field(default=(0.08, 1.0), metadata=_range(0, 1, lo_open=True))


@dataclass(frozen=True)
class AugConfig:
    """One ``data_aug`` entry: ``randaug`` (n ops, magnitude m) or ``erase`` (probability p)."""
    name: str
    n: int = field(default=1, metadata=_NONNEG)
    m: float = field(default=3.0, metadata=_NONNEG)
    p: float = field(default=0.0, metadata=_PROB)


@dataclass(frozen=True)
class DataProviderConfig:
    # the data folder's kind, checked against what the task reads ("" = any of them); the layout is detected
    dataset: str = ""
    data_dir: str = ""
    rrc_config: RRCConfig = field(default_factory=RRCConfig)
    data_aug: tuple[AugConfig, ...] = ()
    base_batch_size: int = field(default=128, metadata=_POS)
    test_batch_size: Union[int, None] = field(default=None, metadata=_POS)
    valid_size: None = None
    n_worker: int = field(default=8, metadata=_NONNEG)
    image_size: tuple[int, ...] = field(default=(128, 160, 192, 224), metadata=_range(1, nonempty=True, sort=True))
    drop_last: bool = True
    hflip: float = field(default=0.5, metadata=_PROB)  # ours: horizontal flip probability (the original's fixed 0.5)


@dataclass(frozen=True)
class MixupConfig:
    op: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class MesaConfig:
    thresh: float = field(default=0.25, metadata=_NONNEG)
    ratio: float = field(default=2.0, metadata=_NONNEG)


@dataclass(frozen=True)
class RunConfig:
    n_epochs: int = field(default=300, metadata=_NONNEG)
    base_lr: float = field(default=0.00025, metadata=_NONNEG)
    warmup_epochs: int = field(default=20, metadata=_NONNEG)
    warmup_lr: float = field(default=0.0, metadata=_NONNEG)
    lr_schedule_name: str = "cosine"
    lr_schedule_param: dict = field(default_factory=dict)
    optimizer_name: str = "adamw"
    optimizer_params: dict = field(default_factory=dict)
    weight_decay: float = field(default=0.1, metadata=_NONNEG)
    no_wd_keys: tuple[str, ...] = ("norm", "bias")
    # {name prefix: factor}: parameters whose name starts with a prefix train at factor x the schedule's lr
    # (mmseg's paramwise_cfg custom_keys lr_mult), e.g. {net.encoder: 0.1} keeps a pre-trained encoder close;
    # on the command line the whole mapping is one value: --run_config.lr_scale "{net.encoder: 0.1}"
    lr_scale: dict = field(default_factory=dict)
    grad_clip: Union[float, None] = field(default=2.0, metadata=_range(0, lo_open=True))
    reset_bn: bool = True
    reset_bn_size: int = field(default=16000, metadata=_POS)
    reset_bn_batch_size: int = field(default=100, metadata=_range(2))
    eval_image_size: tuple[int, ...] = field(default=(224,), metadata=_range(1, nonempty=True))
    label_smooth: float = field(default=0.1, metadata=_range(0, 1, hi_open=True))
    mixup_config: Union[MixupConfig, None] = None
    bce: bool = True
    mesa: Union[MesaConfig, None] = None
    bsizemult: int = field(default=1, metadata=_POS)
    no_eval: bool = False
    channels_last: bool = False  # NHWC weights and activations: faster convolutions in oneDNN and cuDNN


@dataclass(frozen=True)
class BackboneDropConfig:
    name: str = field(default="droppath", metadata=_choices("droppath"))
    drop_prob: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    linear_decay: bool = True
    skip: int = field(default=0, metadata=_NONNEG)


@dataclass(frozen=True)
class NetConfig:
    name: str = "lowformer_b1"
    dropout: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    kwargs: dict = field(default_factory=dict)  # ours: extra model arguments for timm.create_model


@dataclass(frozen=True)
class TrainConfig:
    data_provider: DataProviderConfig = field(default_factory=DataProviderConfig)
    run_config: RunConfig = field(default_factory=RunConfig)
    backbone_drop: BackboneDropConfig = field(default_factory=BackboneDropConfig)
    net_config: NetConfig = field(default_factory=NetConfig)
    ema_decay: float = field(default=0.9998, metadata=_PROB)
    task: str = "classification"  # which registered task trains this config
    sections: dict = field(default_factory=dict, metadata={"internal": True})  # task sections, by name

    def section(self, name: str) -> Any:
        """The task section ``name`` (its dataclass), with its defaults where the file has none."""
        if not _is_section(name):
            raise ConfigError(f"no config section '{name}' is registered (known: {', '.join(sorted(_SECTIONS))})")
        return self.sections.get(name) or _SECTIONS[name]()


_SECTIONS: dict[str, type] = {}

# The tasks this package ships, imported on first use so a recipe names its task without the caller
# importing it first; each registers its section and its task when imported.
BUILTIN_TASKS = {"detection": "lowformer.detection.task", "segmentation": "lowformer.segmentation.task"}


def import_builtin_task(name: str) -> None:
    """Import the shipped task ``name`` (registering its section and task); other names are left alone."""
    if name in BUILTIN_TASKS:
        import_module(BUILTIN_TASKS[name])


def _is_section(key: str) -> bool:
    if key not in _SECTIONS:
        import_builtin_task(key)
    return key in _SECTIONS


def register_section(name: str, cls: type) -> None:
    """Accept a top-level group ``name`` validated as the dataclass ``cls`` (a task's own keys)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if name in known or (name in _SECTIONS and _SECTIONS[name] is not cls):
        raise ValueError(f"config section '{name}' is already defined")
    _SECTIONS[name] = cls


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
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
                          "save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None


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
        data = _yaml_load(_read_text(source), str(source)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of config groups")
        merged = merge(merged, data)
    if overrides:
        merged = merge(merged, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return validate(_build(TrainConfig, merged, ""))


def config_from_dict(data: dict) -> TrainConfig:
    """A config from its plain form (``RUN_DIR/config.yaml``), validated like a file."""
    return validate(_build(TrainConfig, data, ""))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Rules that span several keys (single values are range-checked while they are read)."""
    if total_epochs(cfg) < 1:
        raise ConfigError("run_config.n_epochs + run_config.warmup_epochs is 0: train at least one epoch")
    lo, hi = cfg.data_provider.rrc_config.scale
    if lo > hi:
        raise ConfigError(f"config key 'data_provider.rrc_config.scale': [{lo:g}, {hi:g}] is not an increasing range")
    return cfg


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
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values, sections = {}, {}
    for key, value in data.items():
        if key in fields:
            values[key] = _check(fields[key], _convert(hints[key], value, f"{path}{key}"), f"{path}{key}")
        elif cls is TrainConfig and _is_section(key):
            sections[key] = _build(_SECTIONS[key], value or {}, f"{key}.")
        else:
            raise _unknown_key(f"{path}{key}")
    if sections:
        values["sections"] = sections
    return cls(**values)


def _check(f: dataclasses.Field, value: Any, path: str) -> Any:
    """Apply the field's range or choices metadata to a converted value (each item of a tuple)."""
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ConfigError(f"config key '{path}': {value!r} is not implemented (use {', '.join(f.metadata['choices'])})")
    if "range" not in f.metadata or value is None:
        return value
    lo, hi, lo_open, hi_open = f.metadata["range"]
    items = value if isinstance(value, tuple) else (value,)
    if f.metadata["nonempty"] and not items:
        raise ConfigError(f"config key '{path}': needs at least one value, got []")
    for v in items:
        low = lo is not None and (v <= lo if lo_open else v < lo)
        high = hi is not None and (v >= hi if hi_open else v > hi)
        if low or high:
            bounds = []
            if lo is not None:
                bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
            if hi is not None:
                bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
            raise ConfigError(f"config key '{path}': {v!r} is out of range (must be {' and '.join(bounds)})")
    return tuple(sorted(value)) if f.metadata["sort"] else value


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
    if origin is tuple:
        if value is None and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
            return ()  # a list of entries left empty (``data_aug: null``)
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            if args[0] is AugConfig:
                return tuple(_aug(v, f"{path}[{i}]") for i, v in enumerate(value))
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
    out = plain(dataclasses.asdict(cfg))
    sections = out.pop("sections")
    return {**out, **sections}


# --- derived values --------------------------------------------------------------------------------------

def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """The original's peak learning rate: ``base_lr x bsizemult x world size`` (gradients of the
    bsizemult micro-batches are summed, so the per-sample rate is ``base_lr / base_batch_size``)."""
    return cfg.run_config.base_lr * cfg.run_config.bsizemult * world_size


def global_batch_size(cfg: TrainConfig, world_size: int) -> int:
    return cfg.data_provider.base_batch_size * cfg.run_config.bsizemult * world_size


def total_epochs(cfg: TrainConfig) -> int:
    """Epochs run: ``n_epochs`` count after the warm-up, as in the original (300 + 20 = 320)."""
    return cfg.run_config.n_epochs + cfg.run_config.warmup_epochs



# Keys that change neither the model nor the schedule: a resumed run may take new values silently.
RESUME_SAFE_KEYS = frozenset({"data_provider.data_dir", "data_provider.n_worker", "data_provider.test_batch_size"})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or (prefix and prefix.rstrip(".").rsplit(".", 1)[-1] in ("kwargs", "optimizer_params",
                                                                                      "lr_schedule_param", "lr_scale")):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_changes(stored: dict, requested: dict) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, requested value)`` for every dotted key whose value differs."""
    a, b = _flat(stored), _flat(requested)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
