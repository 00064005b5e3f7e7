"""The trainer on tiny timm models and 32 px real images: schedule, ranks, resume, bad images, divergence."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from lowformer.checkpoints import read_checkpoint
from lowformer.data.datasets import resolution_batch_sampler
from lowformer.train import TrainingDiverged, load_config, train
from lowformer.train.setup import (
    CenterTapConv2d,
    LowformerCosineScheduler,
    build_model,
    center_tap_small_maps,
    no_weight_decay_groups,
)
from torchrun import run_torchrun

CIFAR = Path(__file__).parents[1] / "lowformer" / "assets" / "cifar10-mini"


def make_data(root: Path, classes: int = 2, train: int = 4, val: int = 2) -> Path:
    """A small ImageNet-layout copy of the bundled CIFAR-10 images."""
    for split, n in (("train", train), ("val", val)):
        for c in sorted(p.name for p in (CIFAR / split).iterdir())[:classes]:
            (root / split / c).mkdir(parents=True)
            for f in sorted((CIFAR / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


def tiny_overrides(data: Path, **extra: object) -> dict:
    """A 32 px recipe for a small timm model: everything the recipe does, on a scale that runs in seconds."""
    cfg = {
        "data_provider": {"data_dir": str(data), "base_batch_size": 4, "n_worker": 0, "image_size": [24, 32],
                          "data_aug": [{"name": "randaug", "n": 1, "m": 3}, {"name": "erase", "p": 0.25}]},
        "run_config": {"n_epochs": 1, "warmup_epochs": 1, "base_lr": 1.0e-3, "eval_image_size": [32],
                       "reset_bn_size": 8, "reset_bn_batch_size": 4, "mixup_config": {"op": [["mixup", 0.2, 1.0],
                                                                                          ["cutmix", 0.2, 1.0]]}},
        "backbone_drop": {"drop_prob": 0.0},
        "net_config": {"name": "test_efficientnet"},
    }
    for group, values in extra.items():
        cfg[group] = {**cfg.get(group, {}), **values} if isinstance(values, dict) else values
    return cfg


def test_lr_schedule_warmup_then_cosine_per_micro_batch():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LowformerCosineScheduler(opt, t_initial=4, lr_min=0.0, warmup_t=2, warmup_lr_init=0.0,
                                     warmup_prefix=True, t_in_epochs=False)
    lrs = []
    for t in range(7):
        sched.step_update(t)
        lrs.append(opt.param_groups[0]["lr"])
    # warm-up: peak x (t + 1) / W; then 0.5 peak (1 + cos(pi (t - W) / T)); 0 after T.
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1 * (0.5 + 0.5 ** 0.5 / 2), 0.05, 0.1 * (0.5 - 0.5 ** 0.5 / 2), 0.0])


def test_weight_decay_exemption_is_by_name_substring():
    model = torch.nn.Sequential()
    model.add_module("norm", torch.nn.BatchNorm2d(3))
    model.add_module("main", torch.nn.Sequential(torch.nn.GroupNorm(1, 3), torch.nn.Conv2d(3, 3, 1)))
    decay, no_decay = no_weight_decay_groups(model, 0.1, ["norm", "bias"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["main.0.weight", "main.1.weight"]  # GroupNorm decayed
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["main.0.bias", "main.1.bias", "norm.bias", "norm.weight"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_lr_scale_groups_follow_the_schedule_by_name_prefix():
    from lowformer.train.config import ConfigError, config_from_dict
    from lowformer.train.setup import build_optimizer, build_scheduler
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)))
    model.add_module("encoder_head", torch.nn.Conv2d(3, 2, 1))  # prefix "encoder." must not catch it
    model.add_module("head", torch.nn.Conv2d(2, 2, 1))
    cfg = config_from_dict({"run_config": {"lr_scale": {"encoder.": 0.1, "encoder.1.": 0.5}, "warmup_epochs": 1,
                                           "warmup_lr": 0.0, "weight_decay": 0.05}})
    opt = build_optimizer(model, cfg, lr=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {tuple(sorted(names[id(p)] for p in g["params"])): g for g in opt.param_groups}
    assert {k: (g.get("lr_scale", 1.0), g["weight_decay"]) for k, g in groups.items()} == {
        ("encoder_head.weight", "head.weight"): (1.0, 0.05), ("encoder_head.bias", "head.bias"): (1.0, 0.0),
        ("encoder.0.weight",): (0.1, 0.05), ("encoder.0.bias",): (0.1, 0.0),
        ("encoder.1.weight",): (0.5, 0.05), ("encoder.1.bias",): (0.5, 0.0)}  # the longest prefix wins
    sched = build_scheduler(opt, cfg, warmup=2, total=4)
    for t in (0, 3):
        sched.step_update(t)
        lrs = {k[0]: g["lr"] for k, g in groups.items()}
        peak = 0.2 * ((t + 1) / 2 if t < 2 else 0.5 * (1 + math.cos(math.pi * (t - 2) / 4)))
        assert lrs == pytest.approx({"encoder_head.weight": peak, "encoder_head.bias": peak, "encoder.0.weight":
                                     0.1 * peak, "encoder.0.bias": 0.1 * peak, "encoder.1.weight": 0.5 * peak,
                                     "encoder.1.bias": 0.5 * peak})
    for bad, match in (({"backbone": 0.1}, "no parameter name starts with 'backbone'"), ({"head": -1}, ">= 0")):
        with pytest.raises(ConfigError, match=match):
            build_optimizer(model, config_from_dict({"run_config": {"lr_scale": bad}}), lr=0.1)


def test_resolution_schedule_is_identical_on_every_rank():
    def choices(rank: int, epoch: int) -> list[int]:
        sampler = DistributedSampler(range(96), num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = resolution_batch_sampler(sampler, batch_size=4, num_sizes=4, seed=0)
        batches.set_epoch(epoch)
        out = [[c for _, c in batch] for batch in batches]
        assert all(len(set(b)) == 1 for b in out)  # one resolution per batch
        return [b[0] for b in out]

    rank0, rank1 = choices(0, 3), choices(1, 3)
    assert rank0 == rank1 and len(rank0) == 12 and len(set(rank0)) > 1
    assert choices(0, 4) != rank0  # drawn afresh each epoch


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    data = make_data(tmp_path / "data")
    cfg = load_config("configs/cls/imagenet/b1.yaml", tiny_overrides(data))
    full = train(cfg, tmp_path / "full", progress=False)
    assert full["epochs"] == 2 and full["finished"]
    part = train(cfg, tmp_path / "part", progress=False, stop_after_epochs=1)
    assert part["epochs"] == 1 and not part["finished"]
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["epochs"] == 2 and resumed["finished"]
    a = read_checkpoint(tmp_path / "full/checkpoint/checkpoint.pt")
    b = read_checkpoint(tmp_path / "part/checkpoint/checkpoint.pt")
    for key in ("state_dict", "ema"):
        sa = a[key] if key == "state_dict" else a[key][0.9998]
        sb = b[key] if key == "state_dict" else b[key][0.9998]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    assert resumed["final_top1"] == full["final_top1"] and resumed["best_top1"] == full["best_top1"]
    # The run directory in the original's layout; evalmodel.pt loads through the public API.
    run = tmp_path / "full"
    assert (run / "checkpoint/latest.txt").read_text().splitlines()[0] == "checkpoint.pt"
    assert {"epoch", "best_val", "optimizer", "lr_scheduler", "ema", "scaler", "rng"} <= set(a)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["images_per_s"] > 0 and summary["wall_s"] > 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    import lowformer
    model = lowformer.create_model("test_efficientnet", num_classes=2, checkpoint_path=run / "checkpoint/evalmodel_final.pt")
    assert torch.equal(model.state_dict()["conv_stem.weight"], a["ema"][0.9998]["conv_stem.weight"])


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    data = make_data(tmp_path / "data", train=8)
    bad = data / "train" / "airplane"
    (bad / "truncated.jpg").write_bytes(next(bad.iterdir()).read_bytes()[:60])
    (bad / "not_an_image.jpg").write_text("hello")
    cfg = load_config("configs/cls/imagenet/b1.yaml", tiny_overrides(
        data, run_config={"n_epochs": 1, "warmup_epochs": 0, "no_eval": True},
        data_provider={"base_batch_size": 10, "image_size": [32], "data_aug": None}))
    with caplog.at_level(logging.WARNING):
        summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["skipped_images"] == 2
    assert "truncated.jpg" in caplog.text and "not_an_image.jpg" in caplog.text
    assert "epoch 1: 2 unreadable image(s) skipped" in caplog.text
    assert (tmp_path / "run/metrics.csv").read_text().splitlines()[1].split(",")[7] == "2"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_data(tmp_path / "data")
    overrides = tiny_overrides(data, run_config={"n_epochs": 2, "warmup_epochs": 0, "no_eval": True})
    train(load_config("configs/cls/imagenet/b1.yaml", overrides), tmp_path / "run", progress=False,
          stop_after_epochs=1)
    ckpt = tmp_path / "run/checkpoint/checkpoint.pt"
    before = ckpt.read_bytes()
    overrides["run_config"]["base_lr"] = 1.0e38
    with pytest.raises(TrainingDiverged) as e:
        train(load_config("configs/cls/imagenet/b1.yaml", overrides), tmp_path / "run", resume=True, progress=False,
              allow_config_change=True)
    msg = str(e.value)
    assert "non-finite training loss" in msg and "epoch 2" in msg and str(ckpt) in msg and "(epoch 1)" in msg
    assert ckpt.read_bytes() == before and read_checkpoint(ckpt)["epoch"] == 0


DDP_RECIPE = {
    "data_provider": {"base_batch_size": 4, "n_worker": 0, "image_size": [32], "data_aug": None, "hflip": 0.0,
                      "rrc_config": {"scale": [1.0, 1.0], "train_interpolate": "bilinear"}},
    "run_config": {"n_epochs": 1, "warmup_epochs": 0, "base_lr": 0.1, "optimizer_name": "momentum",
                   "optimizer_params": {"momentum": 0.0}, "weight_decay": 0.0, "grad_clip": None, "label_smooth": 0.0,
                   "mixup_config": None, "bce": False, "no_eval": True},
    "net_config": {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}},
}


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("optimizer_params", "kwargs", "rrc_config"):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out += [f"--{prefix}{k}", json.dumps(v)]
    return out


def test_two_process_torchrun_equals_one_process_on_the_union_batch(tmp_path):
    """One SGD step of 2 ranks x 4 images (gloo) moves the weights by 2 lr x the gradient of the mean loss
    over all 8 images (peak lr = base_lr x world size); 1 process x 8 images moves them by lr x the same
    gradient. A model without batch statistics, augmentation off."""
    data = make_data(tmp_path / "data", classes=2, train=4, val=1)
    flat = _flatten({**DDP_RECIPE, "data_provider": {**DDP_RECIPE["data_provider"], "data_dir": str(data)}})
    proc = run_torchrun(["train", "configs/cls/imagenet/b1.yaml", "--path", str(tmp_path / "ddp"), "--no-progress",
                         *flat])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["rank_param_max_diff"] == 0.0 and ddp["peak_lr"] == pytest.approx(0.2)

    one_cfg = load_config("configs/cls/imagenet/b1.yaml", [*flat, "--data_provider.base_batch_size", "8"])
    one = train(one_cfg, tmp_path / "one", progress=False)
    assert one["world_size"] == 1 and one["peak_lr"] == pytest.approx(0.1)

    torch.manual_seed(0)
    init = build_model(one_cfg, num_classes=2).state_dict()
    w2, w1 = _weights(tmp_path / "ddp/checkpoint/checkpoint.pt"), _weights(tmp_path / "one/checkpoint/checkpoint.pt")
    moved = 0
    for k, w0 in init.items():
        g2, g1 = (w0 - w2[k]) / 0.2, (w0 - w1[k]) / 0.1
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
        moved += int(g1.abs().max() > 0)
    assert moved > len(init) // 2


def test_weight_decay_rule_sees_the_original_names_of_lowformer():
    """The spec: in B1, 30 one-dimensional tensors are decayed (20 GroupNorm pre-norms, 10 attention BNs)."""
    import lowformer
    with torch.device("meta"):
        model = lowformer.create_model("lowformer_b1")
    decay, _ = no_weight_decay_groups(model, 0.1, ["norm", "bias"])
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_1d = sorted(names[id(p)] for p in decay["params"] if p.ndim == 1)
    assert len(decayed_1d) == 30
    assert "stages.2.1.attn.main.1.conv_proj.norm.weight" in decayed_1d and "pre_classifier.1.weight" not in decayed_1d


@pytest.mark.parametrize("variant", ["lowformer_b0", "lowformer_b3", "lowformer_e1", "lowformer_e3"])
def test_evalmodel_files_use_the_original_key_layout(variant):
    import lowformer
    from equivalence import FIXTURES
    from lowformer.checkpoints import _checkpoint_filter, to_original_layout
    from refweights import read_manifest
    with torch.device("meta"):
        model = lowformer.create_model(variant)
    native = model.state_dict()
    original = to_original_layout(native, model)
    assert set(original) == {k for k, _, _ in read_manifest(FIXTURES / variant / "keys.tsv")}
    assert list(_checkpoint_filter(model)(original, model)) == list(native)  # loads back through the filter


def test_train_step_sums_micro_batch_gradients_and_steps_once():
    """bsizemult 2: the optimizer steps once with the sum of both micro-batch gradients; a non-finite
    loss stops before any weight changes."""
    from lowformer.train.step import LossOutput, NonFiniteLoss, StepParts, train_step
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = StepParts(model=model, ddp=model, optimizer=opt)
    xs = [torch.randn(4, 3), torch.randn(4, 3)]

    def loss_of(x):
        return lambda m: LossOutput(m(x).square().mean(), len(x))

    train_step(parts, loss_of(xs[0]), first=True, update=False, step=0)
    assert torch.equal(model.weight, w0)  # no step on the first micro-batch
    train_step(parts, loss_of(xs[1]), first=False, update=True, step=1)
    # d/dw mean((x w)^2) = 2 x^T (x w) / n, by hand, summed over the two micro-batches.
    grad = sum(2 * (x @ w0.T).T @ x / len(x) for x in xs)
    torch.testing.assert_close(model.weight.detach(), w0 - 0.1 * grad)
    w1 = model.weight.detach().clone()
    with pytest.raises(NonFiniteLoss):
        train_step(parts, lambda m: LossOutput(m(xs[0]).sum() * float("nan"), 4), first=True, update=True, step=2)
    assert torch.equal(model.weight, w1)


def test_schedule_answers_step_and_progress_in_one_place():
    from lowformer.train.schedule import TrainSchedule
    cfg = load_config("configs/cls/imagenet/b1.yaml", {"run_config": {"n_epochs": 4, "warmup_epochs": 2}})
    sched = TrainSchedule.build(cfg, batches_per_epoch=5)
    assert (sched.epochs, sched.warmup_steps, sched.cosine_steps) == (6, 10, 20)
    assert sched.global_step(3, 2) == 17 and sched.steps_done(3) == 15
    assert [sched.progress(t) for t in (0, 9, 10, 20, 30)] == [0.0, 0.0, 0.0, 0.5, 1.0]


def test_fine_tune_a_1000_class_checkpoint_on_the_bundled_cifar10_images(tmp_path, caplog):
    """--initial-checkpoint: every tensor but the classifier comes from the checkpoint (lr 0 keeps them), the
    classifier is the fresh 10-class one, and one line says so."""
    import timm
    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", num_classes=1000).state_dict()
    torch.save({"state_dict": source, "epoch": 90}, tmp_path / "in1k.pth")
    data = make_data(tmp_path / "data", classes=10, train=2, val=1)
    cfg = load_config("configs/cls/imagenet/b1.yaml", tiny_overrides(
        data, run_config={"n_epochs": 1, "warmup_epochs": 0, "base_lr": 0.0, "mixup_config": None},
        data_provider={"image_size": [32], "data_aug": None}))
    with caplog.at_level(logging.INFO):
        train(cfg, tmp_path / "run", progress=False, initial_checkpoint=str(tmp_path / "in1k.pth"))
    assert f"initial weights: {tmp_path / 'in1k.pth'}; classifier re-initialised for 10 classes (the checkpoint has " \
           "1000)" in caplog.text
    tuned = read_checkpoint(tmp_path / "run/checkpoint/checkpoint.pt")["state_dict"]
    torch.manual_seed(0)
    fresh = build_model(cfg, num_classes=10).state_dict()
    for k, v in tuned.items():
        if k.startswith("classifier."):
            assert v.shape[0] == 10 and torch.equal(v, fresh[k]), k
        elif "running_" not in k and v.is_floating_point():  # BN statistics move even at lr 0
            assert torch.equal(v, source[k]), k
    # The flag, in both spellings, reaches the same option.
    from lowformer.cli import build_parser
    for flag in ("--initial-checkpoint", "--initial_checkpoint"):
        args, extra = build_parser().parse_known_args(["train", "c.yaml", "--path", "r", flag, "w.pt"])
        assert args.initial_checkpoint == "w.pt" and not extra


def test_initial_checkpoint_of_another_model_is_one_line(tmp_path):
    import timm
    torch.save(timm.create_model("test_vit", num_classes=10).state_dict(), tmp_path / "vit.pth")
    data = make_data(tmp_path / "data")
    cfg = load_config("configs/cls/imagenet/b1.yaml", tiny_overrides(data))
    from lowformer.errors import LowformerError
    with pytest.raises(LowformerError, match="vit.pth") as e:
        train(cfg, tmp_path / "run", progress=False, initial_checkpoint=str(tmp_path / "vit.pth"))
    assert "\n" not in str(e.value)


def test_tensorboard_events_log_interval_and_timm_ema_loading(tmp_path, caplog):
    import timm
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = make_data(tmp_path / "data")
    cfg = load_config("configs/cls/imagenet/b1.yaml", tiny_overrides(data))
    with caplog.at_level(logging.INFO):
        train(cfg, tmp_path / "run", progress=False, log_interval=1)
    # --log-interval without progress bars: a line per interval.
    assert "epoch 1/2, batch 1/2: loss" in caplog.text and "epoch 2/2, batch 2/2: loss" in caplog.text
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/val_top1", "epoch/best_top1"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]  # every micro-batch of both epochs
    assert [e.step for e in acc.Scalars("epoch/val_top1")] == [1, 2]
    rows = (tmp_path / "run/metrics.csv").read_text().splitlines()
    top1 = [float(r.split(",")[4]) for r in rows[1:]]
    assert [e.value for e in acc.Scalars("epoch/val_top1")] == pytest.approx(top1)
    assert "train/first_batch" in tags["images"]
    first = acc.Images("train/first_batch")[0]
    assert first.height in (24, 32) and first.width == 4 * first.height  # the batch of 4, side by side
    assert "config/text_summary" in tags["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "test_efficientnet" in text and "base_batch_size: 4" in text
    # timm's loader finds the EMA of a full checkpoint under state_dict_ema.
    best = read_checkpoint(tmp_path / "run/checkpoint/model_best.pt")
    model = timm.create_model("test_efficientnet", num_classes=2)
    timm.models.load_checkpoint(model, str(tmp_path / "run/checkpoint/model_best.pt"), use_ema=True)
    ema = best["ema"][0.9998]
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    timm.models.load_checkpoint(model, str(tmp_path / "run/checkpoint/model_best.pt"), use_ema=False)
    assert torch.equal(model.state_dict()["conv_stem.weight"], best["state_dict"]["conv_stem.weight"])
    assert not torch.equal(ema["conv_stem.weight"], best["state_dict"]["conv_stem.weight"])


def test_log_wandb_without_the_package_is_one_line_before_any_work(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    from lowformer.errors import LowformerError
    cfg = load_config("configs/cls/imagenet/b1.yaml", tiny_overrides(tmp_path / "data-not-read"))
    with pytest.raises(LowformerError, match="--log-wandb: the wandb package is not installed; pip install wandb"):
        train(cfg, tmp_path / "run", progress=False, log_wandb=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tokens, dest, value", [
    (["--manual_seed", "3"], "manual_seed", 3), (["--manual-seed", "3"], "manual_seed", 3),
    (["--stop-after-epochs", "2"], "stop_after_epochs", 2), (["--stop_after_epochs", "2"], "stop_after_epochs", 2),
    (["--log-interval", "7"], "log_interval", 7), (["--log_interval", "7"], "log_interval", 7),
    (["--no_progress"], "no_progress", True), (["--allow_config_change"], "allow_config_change", True),
    (["--log_wandb"], "log_wandb", True),
])
def test_train_flags_take_dashes_and_underscores(tokens, dest, value):
    from lowformer.cli import build_parser
    args, extra = build_parser().parse_known_args(["train", "c.yaml", "--path", "r", *tokens])
    assert getattr(args, dest) == value and extra == []


def _rank_diff_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from lowformer.train.distributed import DistContext, rank_max_diff
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    model(torch.randn(2, 3, 4, 4) + rank)  # BN statistics of each rank's own data
    ctx = DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    diffs = rank_max_diff(ctx, model)
    if rank == 0:
        Path(out).write_text(json.dumps(diffs))
    dist.destroy_process_group()


def test_rank_check_compares_parameters_and_reports_buffers_apart(tmp_path):
    """Identical parameters give 0.0 even when BN running statistics differ across ranks (DDP does not
    synchronise buffers); the buffer difference is reported on its own."""
    import torch.multiprocessing as mp
    out = tmp_path / "diffs.json"
    mp.spawn(_rank_diff_worker, args=(f"file://{tmp_path / 'store'}", str(out)), nprocs=2)
    params, buffers = json.loads(out.read_text())
    # The same two replicas in this process: their largest buffer difference.
    replicas = []
    for rank in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        model(torch.randn(2, 3, 4, 4) + rank)
        replicas.append(dict(model.named_buffers()))
    expected = max((replicas[0][k] - replicas[1][k]).abs().max().item() for k in replicas[0]
                   if replicas[0][k].is_floating_point())
    assert params == 0.0 and expected > 0 and buffers == pytest.approx(expected)


def test_a_task_plugs_into_the_loop_with_its_own_config_section(tmp_path):
    """A regression task (lower is better) with a registered config section: the loop trains it, picks the
    best epoch by its metric's direction, writes its columns and publishes its weights."""
    import dataclasses

    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lowformer.train import LossOutput, Task, register_section
    from lowformer.train.config import ConfigError

    @dataclasses.dataclass(frozen=True)
    class ToySection:
        width: int = 3

    register_section("toy_regression", ToySection)

    class ToyTask(Task):
        name, metric, higher_is_better, metric_names = "toy", "mse", False, ("mse",)

        def data(self, n: int, seed: int) -> TensorDataset:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, self.cfg.section("toy_regression").width, generator=g)
            return TensorDataset(x, x.sum(1, keepdim=True))

        def build_model(self):
            return torch.nn.Linear(self.cfg.section("toy_regression").width, 1)

        def build_train_loader(self):
            ds = self.data(16, 1)
            return DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=1, rank=0, seed=self.seed))

        def loss(self, model, batch, info):
            x, y = batch
            return LossOutput(F.mse_loss(model(x), y), len(x))

        def validate(self, model, info):
            x, y = self.data(8, 2).tensors
            with torch.no_grad():
                return {"mse": F.mse_loss(model(x), y).item()}

    overrides = {"toy_regression": {"width": 5}, "ema_decay": 0.0, "backbone_drop": {"drop_prob": 0.0},
                 "run_config": {"n_epochs": 3, "warmup_epochs": 0, "base_lr": 0.05, "optimizer_name": "sgd",
                                "weight_decay": 0.0, "grad_clip": None},
                 "data_provider": {"base_batch_size": 4}}
    cfg = load_config("configs/cls/imagenet/b1.yaml", overrides)
    assert cfg.section("toy_regression").width == 5
    with pytest.raises(ConfigError, match="unknown config key 'toy_regression.depth'"):
        load_config("configs/cls/imagenet/b1.yaml", {"toy_regression": {"depth": 2}})
    summary = train(cfg, tmp_path / "run", task=ToyTask, progress=False)
    rows = (tmp_path / "run/metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["epoch", "lr", "train_loss", "val_mse", "best_mse"]
    mse = [float(r.split(",")[3]) for r in rows[1:]]
    assert summary["best_mse"] == pytest.approx(min(mse), abs=1e-6) and summary["best_epoch"] == mse.index(min(mse)) + 1
    assert summary["final_mse"] == pytest.approx(mse[-1], abs=1e-6) and summary["task"] == "toy"
    published = torch.load(tmp_path / "run/checkpoint/evalmodel.pt", weights_only=True)
    assert published["weight"].shape == (1, 5)


def test_channels_last_trains_the_same_network_and_writes_loadable_checkpoints(tmp_path):
    """NHWC is a layout, not a different network: the first epoch's loss agrees with NCHW's to rounding
    (later weights drift apart by up to an Adam step, since Adam turns rounding-level gradient differences
    into full steps), the weights are trained NHWC, and the checkpoint loads into a plain (NCHW) model."""
    data = make_data(tmp_path / "data")
    runs = {}
    for name, flag in (("nchw", False), ("nhwc", True)):
        cfg = load_config("configs/cls/imagenet/b1.yaml", tiny_overrides(
            data, data_provider={"data_aug": None},
            run_config={"mixup_config": None, "reset_bn": False, "channels_last": flag}))
        assert cfg.run_config.channels_last is flag
        train(cfg, tmp_path / name, progress=False)
        rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
        runs[name] = float(dict(zip(rows[0].split(","), rows[1].split(",")))["train_loss"])
    assert runs["nhwc"] == pytest.approx(runs["nchw"], rel=1e-4)
    b = _weights(tmp_path / "nhwc/checkpoint/checkpoint.pt")
    assert b["conv_stem.weight"].is_contiguous(memory_format=torch.channels_last)
    import lowformer
    model = lowformer.create_model("test_efficientnet", num_classes=2,
                                   checkpoint_path=tmp_path / "nhwc/checkpoint/evalmodel_final.pt")
    assert model.conv_stem.weight.is_contiguous()
    ema = read_checkpoint(tmp_path / "nhwc/checkpoint/checkpoint.pt")["ema"][0.9998]
    assert torch.equal(model.conv_stem.weight, ema["conv_stem.weight"])


@pytest.mark.parametrize("kernel,groups,padding,stride,size", [
    (3, 8, 1, 1, 1), (5, 1, 2, 1, 1), ((3, 5), 2, (1, 2), 1, 1),  # the centre tap is taken
    (3, 8, 1, 1, 2), (3, 8, 0, 1, 3), (3, 8, 1, 2, 1),  # larger map, valid padding, stride 2: plain conv
])
def test_center_tap_conv_equals_the_full_kernel(kernel, groups, padding, stride, size):
    """On a 1x1 map every tap but the centre meets zero padding, so the shortcut must give the same outputs and
    gradients as ``nn.Conv2d`` (computed here by the parent class itself); anywhere else it is the parent."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, kernel, stride, padding, groups=groups)
    x = torch.randn(3, 8, size, size, requires_grad=True)
    want = torch.nn.Conv2d.forward(conv, x)
    gw, gx = torch.autograd.grad(want.square().sum(), (conv.weight, x))
    center_tap_small_maps(conv)
    assert type(conv) is CenterTapConv2d and list(conv.state_dict()) == ["weight", "bias"]
    got = conv(x)
    hw, hx = torch.autograd.grad(got.square().sum(), (conv.weight, x))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hw, gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hx, gx, rtol=1e-5, atol=1e-6)
    if size == 1 and stride == 1 and padding:
        off = [k // 2 for k in conv.kernel_size]
        assert gw[:, :, :off[0]].abs().sum() == 0  # the taps the shortcut drops get no gradient in the full conv


def test_trainer_runs_convolutions_through_the_center_tap_shortcut(tmp_path):
    """The trainer swaps every plain conv (a 32 px LowFormer-B0 reaches 1x1 maps) and still writes checkpoints
    that load into an unmodified model."""
    from lowformer.train.distributed import DistContext
    from lowformer.train.loop import Trainer
    data = make_data(tmp_path / "data")
    cfg = load_config("configs/cls/imagenet/b1.yaml", tiny_overrides(
        data, data_provider={"data_aug": None, "image_size": [32]},
        run_config={"mixup_config": None, "reset_bn": False}, net_config={"name": "lowformer_b0"}))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(cfg, tmp_path / "run", ctx, progress=False)
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m) is CenterTapConv2d for m in convs)
    trainer.run()
    import lowformer
    model = lowformer.create_model("lowformer_b0", num_classes=2,
                                   checkpoint_path=tmp_path / "run/checkpoint/evalmodel_final.pt")
    assert all(type(m) is torch.nn.Conv2d for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the EMA network the trainer ran through the shortcut, against the plain reload
        torch.testing.assert_close(model.eval()(x), trainer.ema.module.eval()(x), rtol=1e-5, atol=1e-5)
