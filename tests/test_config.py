"""Recipes: merge order, override parsing, strict keys and types, the shipped values, the lr rule."""
from __future__ import annotations

import pytest

from lowformer.train.config import (
    ConfigError,
    global_batch_size,
    load_config,
    parse_overrides,
    peak_lr,
    resolve_config_path,
    total_epochs,
)


def test_defaults_then_variant_then_overrides():
    cfg = load_config("configs/cls/imagenet/b3.yaml", ["--run_config.n_epochs", "5",
                                                       "--data_provider.image_size", "[224,128,160]"])
    assert cfg.run_config.weight_decay == 0.1 and cfg.ema_decay == 0.9998           # default.yaml
    assert cfg.run_config.bsizemult == 4 and cfg.data_provider.base_batch_size == 75   # b3.yaml
    assert [a.name for a in cfg.data_provider.data_aug] == ["randaug", "erase"]        # list replaces dict
    assert cfg.run_config.mixup_config.op == (("mixup", 0.2, 1.0), ("cutmix", 0.2, 1.0))
    assert cfg.run_config.n_epochs == 5 and cfg.data_provider.image_size == (128, 160, 224)  # overrides, sorted
    assert cfg.data_provider.rrc_config.test_crop_ratio == 0.95
    assert cfg.data_provider.rrc_config.test_interpolate == "bicubic"                   # nested dicts merge


def test_override_values_parse_as_yaml_1_2():
    out = parse_overrides(["--a.b", "1e-3", "--a.c", "[128,160]", "--d", "true", "--e", "null", "--f", "128-160",
                           "--g", "{x:1}", "--h=2.5E2"])
    assert out == {"a": {"b": 0.001, "c": [128, 160]}, "d": True, "e": None, "f": "128-160", "g": {"x": 1},
                   "h": 250.0}
    assert load_config("configs/cls/imagenet/b1.yaml", ["--run_config.base_lr", "1e-3"]).run_config.base_lr == 0.001
    # keys holding dots (parameter-name prefixes) are set as one mapping value, not as a dotted path
    scale = load_config("configs/cls/imagenet/b1.yaml", ["--run_config.lr_scale", "{net.encoder:0.1, head: 2}"])
    assert scale.run_config.lr_scale == {"net.encoder": 0.1, "head": 2}


@pytest.mark.parametrize("tokens, message", [
    (["--run_config.n_epoch", "3"], "unknown config key 'run_config.n_epoch'; did you mean 'run_config.n_epochs'?"),
    (["--data_provider.rrc_config.test_crop", "1"], "did you mean 'data_provider.rrc_config.test_crop_ratio'?"),
    (["--run_config.mixup_config.mesa", "{thresh: 0.25}"], "unknown config key 'run_config.mixup_config.mesa'"),
    (["--run_config.base_lr", "fast"], "'run_config.base_lr': expected a number, got 'fast'"),
    (["--run_config.bce", "1"], "'run_config.bce': expected true or false"),
    (["--run_config.n_epochs"], "override '--run_config.n_epochs' has no value"),
    (["n_epochs", "3"], "unexpected argument 'n_epochs'"),
    (["--backbone_drop.name", "dropblock"], "'backbone_drop.name': 'dropblock' is not implemented (use droppath)"),
])
def test_bad_keys_and_values_are_named(tokens, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/cls/imagenet/b1.yaml", tokens)
    assert message in str(e.value)


def test_default_files_stop_at_the_configs_root(tmp_path, monkeypatch):
    (tmp_path / "configs" / "cls" / "x").mkdir(parents=True)
    (tmp_path / "default.yaml").write_text("ema_decay: 0.5\n")  # outside the configs root: ignored
    (tmp_path / "configs" / "default.yaml").write_text("run_config: {n_epochs: 7, base_lr: 1.0e-2}\n")
    (tmp_path / "configs" / "cls" / "x" / "default.yaml").write_text("run_config: {n_epochs: 9}\n")
    (tmp_path / "configs" / "cls" / "x" / "m.yaml").write_text("net_config: {name: resnet18}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/cls/x/m.yaml")
    assert (cfg.run_config.n_epochs, cfg.run_config.base_lr, cfg.ema_decay) == (9, 0.01, 0.9998)
    assert cfg.net_config.name == "resnet18"


def test_shipped_recipes_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_config_path("configs/cls/imagenet/b1.yaml")
    assert path.is_file() and path.parts[-4:] == ("configs", "cls", "imagenet", "b1.yaml")
    with pytest.raises(ConfigError, match="shipped recipes: .*cls/imagenet/b0.yaml"):
        resolve_config_path("configs/cls/imagenet/b9.yaml")


# The spec's per-variant table: batch/GPU, bsizemult, base_lr, RandAug (n, m), erase p, mixup alpha, MESA, drop path (skip).
RECIPES = {
    "b0": (170, 1, 3.32e-4, (1, 3), 0.0, 0.1, False, 0.05, 0),
    "b1": (128, 1, 2.5e-4, (1, 3), 0.0, 0.1, False, 0.05, 0),
    "b15": (170, 1, 1.66e-4, (2, 6), 0.0, 0.3, False, 0.1, 0),
    "b3": (75, 4, 9.4e-5, (2, 5), 0.2, 0.2, True, 0.1, 2),
    "e1": (100, 2, 1.0e-4, (2, 6), 0.0, 0.3, False, 0.1, 0),
    "e2": (50, 4, 1.0e-4, (2, 5), 0.2, 0.2, True, 0.1, 1),
    "e3": (50, 8, 6.25e-5, (2, 5), 0.2, 0.3, True, 0.1, 2),
}


@pytest.mark.parametrize("variant", sorted(RECIPES))
def test_shipped_recipes_hold_the_original_values(variant):
    batch, mult, lr, (n, m), erase, alpha, mesa, drop, skip = RECIPES[variant]
    cfg = load_config(f"configs/cls/imagenet/{variant}.yaml")
    rc, dp = cfg.run_config, cfg.data_provider
    assert cfg.net_config.name == f"lowformer_{variant}"
    assert (dp.base_batch_size, rc.bsizemult, rc.base_lr) == (batch, mult, lr)
    randaug = [a for a in dp.data_aug if a.name == "randaug"][0]
    assert (randaug.n, randaug.m) == (n, m)
    assert sum(a.p for a in dp.data_aug if a.name == "erase") == erase
    assert {op[1] for op in rc.mixup_config.op} == {alpha}
    assert (rc.mesa is not None) == mesa
    assert (cfg.backbone_drop.drop_prob, cfg.backbone_drop.skip) == (drop, skip)
    assert total_epochs(cfg) == 320 and rc.bce and rc.grad_clip == 2.0 and dp.image_size == (128, 160, 192, 224)


def test_peak_lr_is_base_lr_times_bsizemult_times_world_size():
    b1 = load_config("configs/cls/imagenet/b1.yaml")
    assert peak_lr(b1, 8) == pytest.approx(2.0e-3) and global_batch_size(b1, 8) == 1024  # the spec's example
    e3 = load_config("configs/cls/imagenet/e3.yaml")
    assert peak_lr(e3, 1) == pytest.approx(5.0e-4) and peak_lr(e3, 4) == pytest.approx(2.0e-3)
    assert global_batch_size(e3, 4) == 50 * 8 * 4
    assert e3.run_config.base_lr == 6.25e-5  # the loaded config is never multiplied in place


def test_cifar10_recipe_warms_up_at_most_one_epoch_and_takes_a_data_dir():
    cfg = load_config("configs/cls/cifar10/b0.yaml", ["--data_provider.data_dir", "/data/c10"])
    assert cfg.run_config.warmup_epochs <= 1 and cfg.net_config.name == "lowformer_b0"
    assert cfg.data_provider.data_dir == "/data/c10"
