"""Fault injection on the run directory: a kill at each file write of an epoch, a full disk, two trainers
in one directory, a changed config on resume, bad values and files. Each run either resumes to the
uninterrupted result or fails with one line, and leaves the files it must not touch unchanged."""
from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lowformer.checkpoints import read_checkpoint
from lowformer.errors import LowformerError
from lowformer.train import RunDir, RunDirError, RunDirLocked, load_config, train
from lowformer.train.config import ConfigError, config_to_dict
from lowformer.train.rundir import FAULT_ENV, set_write_hook
from test_train import make_data, tiny_overrides

ROOT = Path(__file__).parents[1]
RECIPE = "configs/cls/imagenet/b1.yaml"
TIMING = {"images_per_s", "epoch_s", "wall_s"}


class Crash(BaseException):
    """Stands in for the process dying: nothing after the write runs, no exception handler sees it."""


@pytest.fixture(autouse=True)
def _no_hook():
    yield
    set_write_hook(None)


def _recorder(names: list[str]):
    def hook(target: Path, f, data: bytes) -> None:
        names.append(target.name)
    return hook


def _crash_at(n: int, error: OSError | None = None):
    """Cut the n-th write in half, then die (or raise ``error``, as a failing disk would)."""
    count = [0]

    def hook(target: Path, f, data: bytes) -> None:
        count[0] += 1
        if count[0] == n:
            f.write(data[:len(data) // 2])
            f.flush()
            if error is not None:
                raise error
            raise Crash(target.name)
    return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run and the order of its file writes."""
    root = tmp_path_factory.mktemp("faults")
    data = make_data(root / "data")
    cfg = load_config(RECIPE, tiny_overrides(data))
    writes: list[str] = []
    set_write_hook(_recorder(writes))
    try:
        train(cfg, root / "ref", progress=False)
    finally:
        set_write_hook(None)
    return cfg, root / "ref", writes


def _nth_write(writes: list[str], name: str, occurrence: int) -> int:
    """1-based index of the ``occurrence``-th write of ``name``."""
    seen = 0
    for i, w in enumerate(writes):
        seen += w == name
        if seen == occurrence:
            return i + 1
    raise AssertionError(f"{name} written fewer than {occurrence} times: {writes}")


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def assert_same_run(run: Path, ref: Path) -> None:
    a, b = read_checkpoint(run / "checkpoint/checkpoint.pt"), read_checkpoint(ref / "checkpoint/checkpoint.pt")
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert (a["epoch"], a["best_val"], a["best_epoch"]) == (b["epoch"], b["best_val"], b["best_epoch"])
    best_a, best_b = (read_checkpoint(p / "checkpoint/model_best.pt") for p in (run, ref))
    assert best_a["epoch"] == best_b["epoch"] == a["best_epoch"]
    for name in ("evalmodel.pt", "evalmodel_final.pt"):
        ea, eb = read_checkpoint(run / "checkpoint" / name), read_checkpoint(ref / "checkpoint" / name)
        assert all(torch.equal(ea[k], eb[k]) for k in eb), name
    assert _rows(run / "metrics.csv") == _rows(ref / "metrics.csv") and len(_rows(ref / "metrics.csv")) == 2
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (run, ref))
    assert {k: v for k, v in sa.items() if k not in TIMING} == {k: v for k, v in sb.items() if k not in TIMING}
    assert (run / "checkpoint/latest.txt").read_text() == (ref / "checkpoint/latest.txt").read_text()
    assert not list(run.rglob("*.tmp"))


# Every write of the first epoch's commit (the first epoch is always the best so far), and the last
# epoch's own files. CI runs the first write, one derived file and the pointer of each commit; the
# rest, which exercise the same roll-forward, under the slow marker.
_slow = pytest.mark.slow
KILL_POINTS = [("checkpoint.pt", 1), pytest.param("model_best.pt", 1, marks=_slow),
               pytest.param("evalmodel.pt", 1, marks=_slow), ("metrics.csv", 1),
               pytest.param("summary.json", 1, marks=_slow), ("latest.txt", 1), ("checkpoint.pt", 2),
               ("evalmodel_final.pt", 1), pytest.param("latest.txt", 2, marks=_slow)]


@pytest.mark.parametrize("name, occurrence", KILL_POINTS)
def test_kill_at_each_write_then_resume_equals_uninterrupted(reference, tmp_path, name, occurrence):
    cfg, ref, writes = reference
    set_write_hook(_crash_at(_nth_write(writes, name, occurrence)))
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", progress=False)
    set_write_hook(None)
    assert list((tmp_path / "run").rglob(f"{name}.tmp"))  # the half-written file the crash left
    if (tmp_path / "run/checkpoint/checkpoint.pt").is_file():
        train(cfg, tmp_path / "run", resume=True, progress=False)
    else:  # killed before the first checkpoint existed: nothing to resume, a fresh start is allowed
        with pytest.raises(LowformerError, match="no checkpoint .* start without --resume"):
            train(cfg, tmp_path / "run", resume=True, progress=False)
        train(cfg, tmp_path / "run", progress=False)
    assert_same_run(tmp_path / "run", ref)


def test_sigkill_while_model_best_is_written_resumes_and_takes_over_the_stale_lock(reference, tmp_path):
    """The reported case, killed for real: SIGKILL while model_best.pt.tmp is written."""
    cfg, ref, writes = reference
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           FAULT_ENV: str(_nth_write(writes, "model_best.pt", 1))}
    proc = subprocess.run([sys.executable, "-m", "lowformer", "train", str(config), "--path", str(tmp_path / "run"),
                           "--no-progress"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / "checkpoint/model_best.pt.tmp").stat().st_size > 0 and not (run / "checkpoint/latest.txt").exists()
    holder = (run / "train.lock").read_text().split()  # left by the dead trainer: "pid N on host H"
    with pytest.raises(ProcessLookupError):
        os.kill(int(holder[1]), 0)
    train(cfg, run, resume=True, progress=False)
    assert_same_run(run, ref)
    assert not (run / "train.lock").exists()


@pytest.mark.parametrize("name, occurrence", [("checkpoint.pt", 2), ("latest.txt", 1)])
def test_full_disk_fails_with_one_line_and_resumes(reference, tmp_path, capsys, name, occurrence):
    from lowformer.cli import main
    cfg, ref, writes = reference
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    set_write_hook(_crash_at(_nth_write(writes, name, occurrence), OSError(errno.ENOSPC, "No space left on device")))
    assert main(["train", str(config), "--path", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write '{name}': no space left in '{tmp_path / 'run/checkpoint'}'" in err[0]
    assert "MB needed" in err[0] and "MB free" in err[0] and "--resume" in err[0]
    assert not list((tmp_path / "run").rglob("*.tmp"))  # nothing left that keeps the disk full
    set_write_hook(None)
    train(cfg, tmp_path / "run", resume=True, progress=False)
    assert_same_run(tmp_path / "run", ref)


def test_write_error_raises_run_dir_error(tmp_path):
    rd = RunDir(tmp_path)
    set_write_hook(_crash_at(1, OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(RunDirError, match=r"cannot write 'x.txt' in '.*': Permission denied"):
        rd.write_text(tmp_path / "x.txt", "hello")
    assert list(tmp_path.iterdir()) == []


def test_a_second_trainer_in_the_same_directory_gets_one_line(reference, tmp_path):
    cfg, _, _ = reference
    holder = RunDir(tmp_path / "run")
    holder.lock()
    try:
        with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()} on host .*; wait for that training"):
            train(cfg, tmp_path / "run", progress=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train.lock"]  # nothing written
    finally:
        holder.unlock()


def test_concurrent_process_holds_the_directory(reference, tmp_path):
    cfg, _, _ = reference
    (tmp_path / "run").mkdir()
    code = ("import sys, time; from lowformer.train import RunDir; r = RunDir(sys.argv[1]); r.lock(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"in use by pid {proc.pid} on host"):
            train(cfg, tmp_path / "run", progress=False)
    finally:
        proc.kill()
        proc.wait()
    train(cfg, tmp_path / "run", progress=False, stop_after_epochs=1)  # the dead holder's lock is taken over


@pytest.fixture()
def one_epoch(reference, tmp_path):
    cfg, _, _ = reference
    train(cfg, tmp_path / "run", progress=False, stop_after_epochs=1)
    run = tmp_path / "run"
    return cfg, run, {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tfevents" not in p.name}


def _unchanged(files: dict[Path, bytes]) -> None:
    for p, content in files.items():
        assert p.read_bytes() == content, p


@pytest.mark.parametrize("override, key", [
    ({"net_config": {"name": "test_vit"}}, "net_config.name 'test_efficientnet' -> 'test_vit'"),
    ({"run_config": {"base_lr": 2.0e-3}}, "run_config.base_lr 0.001 -> 0.002"),
    ({"data_provider": {"base_batch_size": 2}}, "data_provider.base_batch_size 4 -> 2"),
    ({"run_config": {"n_epochs": 3}}, "run_config.n_epochs 1 -> 3"),
])
def test_resume_refuses_a_config_that_changes_model_or_schedule(one_epoch, override, key):
    cfg, run, files = one_epoch
    data = config_to_dict(cfg)
    for group, values in override.items():
        data[group] = {**data[group], **values}
    from lowformer.train.config import config_from_dict
    with pytest.raises(LowformerError) as e:
        train(config_from_dict(data), run, resume=True, progress=False)
    assert key in str(e.value) and "--allow-config-change" in str(e.value) and "\n" not in str(e.value)
    _unchanged(files)


def test_allowed_model_change_that_cannot_load_keeps_the_record(one_epoch):
    cfg, run, files = one_epoch
    from lowformer.train.config import config_from_dict
    data = config_to_dict(cfg)
    data["net_config"] = {**data["net_config"], "name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}
    with pytest.raises(LowformerError, match="does not fit the requested model") as e:
        train(config_from_dict(data), run, resume=True, progress=False, allow_config_change=True)
    assert "\n" not in str(e.value)
    _unchanged(files)


def test_resume_accepts_changes_that_leave_the_training_alone(one_epoch, reference):
    cfg, run, _ = one_epoch
    from lowformer.train.config import config_from_dict
    data = config_to_dict(cfg)
    data["data_provider"] = {**data["data_provider"], "test_batch_size": 3}
    train(config_from_dict(data), run, resume=True, progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["data_provider"]["test_batch_size"] == 3
    a, b = (read_checkpoint(p / "checkpoint/checkpoint.pt")["state_dict"] for p in (run, reference[1]))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_bare_state_dict_is_one_line(one_epoch):
    cfg, run, _ = one_epoch
    torch.save(read_checkpoint(run / "checkpoint/checkpoint.pt")["state_dict"], run / "checkpoint/checkpoint.pt")
    with pytest.raises(LowformerError, match="holds weights only, not a training checkpoint.*--initial-checkpoint"):
        train(cfg, run, resume=True, progress=False)


def test_a_new_run_in_a_used_directory_is_refused(one_epoch):
    cfg, run, files = one_epoch
    with pytest.raises(LowformerError, match="already holds a run; add --resume"):
        train(cfg, run, progress=False)
    _unchanged(files)


@pytest.mark.parametrize("group, values, message", [
    ("run_config", {"eval_image_size": []}, "'run_config.eval_image_size': needs at least one value"),
    ("run_config", {"eval_image_size": [0]}, "'run_config.eval_image_size': 0 is out of range (must be >= 1)"),
    ("data_provider", {"base_batch_size": 0}, "'data_provider.base_batch_size': 0 is out of range"),
    ("run_config", {"bsizemult": 0}, "'run_config.bsizemult': 0 is out of range"),
    ("data_provider", {"image_size": [0]}, "'data_provider.image_size': 0 is out of range"),
    ("data_provider", {"image_size": [32, -8]}, "'data_provider.image_size': -8 is out of range"),
    ("data_provider", {"n_worker": -1}, "'data_provider.n_worker': -1 is out of range (must be >= 0)"),
    ("data_provider", {"test_batch_size": 0}, "'data_provider.test_batch_size': 0 is out of range"),
    ("run_config", {"label_smooth": 1.5}, "'run_config.label_smooth': 1.5 is out of range (must be >= 0 and < 1)"),
    ("run_config", {"n_epochs": 0, "warmup_epochs": 0}, "train at least one epoch"),
    ("data_provider", {"rrc_config": {"test_crop_ratio": 0}}, "'data_provider.rrc_config.test_crop_ratio': 0"),
])
def test_bad_values_fail_when_the_config_is_read(tmp_path, group, values, message):
    overrides = tiny_overrides(tmp_path, **{group: values})
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, overrides)
    assert message in str(e.value)


def test_config_files_that_are_not_utf8_or_not_yaml_are_named_with_the_place(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("net_config: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 22 is 0xe9\); save the file as UTF-8"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_config:\n  n_epochs: 3\n  base_lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line 4, column 1: not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("kwargs, message", [
    ({"stop_after_epochs": 0}, "--stop-after-epochs 0: must be at least 1"),
    ({"log_interval": 0}, "--log-interval 0: must be at least 1"),
    ({"initial_checkpoint": "missing.pt"}, "--initial-checkpoint 'missing.pt': file not found"),
    ({"amp": "fp8"}, "amp mode 'fp8'"),
])
def test_bad_arguments_fail_before_any_file_is_written(reference, tmp_path, kwargs, message):
    cfg, _, _ = reference
    with pytest.raises(LowformerError, match=message):
        train(cfg, tmp_path / "run", progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module,extra,where,call,args", [
    ("segmentation_models_pytorch", "segmentation", "lowformer.segmentation", "create_segmenter",
     ("semantic_fpn", "lowformer_b0", 2)),
    ("pycocotools.coco", "detection", "lowformer.detection.data", "CocoDetectionData", ("images", "instances.json")),
    ("onnxruntime", "onnx", "lowformer.deploy.onnx", "ort_session", (b"",)),
    ("openvino", "openvino", "lowformer.deploy.openvino", "compile_openvino", (None,)),
    ("matplotlib", "plot", "lowformer.bench.results", "plot_figure", ([],)),
])
def test_a_missing_optional_package_is_one_line_naming_the_extra(monkeypatch, module, extra, where, call, args):
    function = getattr(importlib.import_module(where), call)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError, imported before or not
    package = module.split(".")[0].replace("_", "-")
    with pytest.raises(LowformerError, match=rf"^.* needs {package}: pip install 'lowformer\[{extra}\]'$"):
        function(*args)
