"""Checkpoint reading is safe and its failures are one clear line."""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import types

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

import lowformer
from equivalence import assert_close_rule, case_input, fixture, original_state_dict
from lowformer import CheckpointError


@pytest.fixture(scope="module")
def b0_state():
    return original_state_dict("lowformer_b0")


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("lowformer_b0", checkpoint_path=tmp_path / "nope.pt")
    assert "nope.pt" in _one_line(e) and "not found" in str(e.value)


def test_truncated_file(tmp_path, b0_state):
    path = tmp_path / "evalmodel.pt"
    torch.save(b0_state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("lowformer_b0", checkpoint_path=path)
    assert str(path) in _one_line(e) and "truncated or corrupt" in str(e.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, b0_state):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": b0_state, "payload": exploit}, path)
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("lowformer_b0", checkpoint_path=path)
    assert "refused" in _one_line(e) and "system" in str(e.value)
    assert not marker.exists()


def test_legacy_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil_legacy.pt"
    torch.save({"payload": exploit}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError):
        lowformer.read_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_of_another_variant(tmp_path):
    path = tmp_path / "b1.pt"
    torch.save(original_state_dict("lowformer_b1"), path)
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("lowformer_b0", checkpoint_path=path)
    msg = _one_line(e)
    assert "lowformer_b0" in msg and str(path) in msg
    assert "unexpected keys" in msg and "shape mismatches" in msg and "e.g." in msg


def test_missing_keys_are_counted(tmp_path, b0_state):
    sd = {k: v for k, v in b0_state.items() if not k.startswith("head.")}
    path = tmp_path / "nohead.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("lowformer_b0", checkpoint_path=path)
    n_head = len([k for k, v in b0_state.items() if k.startswith("head.") and v.is_floating_point()])
    assert f"{n_head} missing keys" in _one_line(e)


def test_non_strict_load_keeps_matching_weights(tmp_path, b0_state):
    sd = {k: v for k, v in b0_state.items() if not k.startswith("head.op_list.3")}
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    model = lowformer.load_checkpoint(lowformer.create_model("lowformer_b0"), path, strict=False)
    torch.testing.assert_close(model.stem[0].conv.weight, b0_state["backbone.input_stem.op_list.0.conv.weight"])


def test_argparse_namespace_metadata_is_allowed(tmp_path, b0_state):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": b0_state, "args": argparse.Namespace(lr=1e-3, model="b0"), "epoch": 3}, path)
    model = lowformer.create_model("lowformer_b0", checkpoint_path=path).eval()
    case = fixture("lowformer_b0")["cases"][1]
    with torch.no_grad():
        assert_close_rule(model(case_input(case)), case["output"])


def test_yacs_config_metadata_is_allowed_without_yacs(tmp_path, b0_state, monkeypatch):
    """Original DWNet files carry a yacs CfgNode; it unpickles as a plain dict, yacs not needed."""
    yacs = types.ModuleType("yacs")
    config = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    config.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    cfg = CfgNode(MODEL=CfgNode(NAME="b0"), TRAIN=CfgNode(EPOCHS=300))
    cfg.__dict__["__immutable__"] = True
    path = tmp_path / "yacs.pth"
    torch.save({"model": b0_state, "config": cfg, "epoch": 299}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    loaded = lowformer.read_checkpoint(path)
    assert loaded["config"]["MODEL"]["NAME"] == "b0"
    lowformer.create_model("lowformer_b0", checkpoint_path=path)


def test_safetensors_round_trip_and_corrupt(tmp_path, b0_state):
    model = lowformer.create_model("lowformer_b0", checkpoint_path=_save_pt(tmp_path, b0_state)).eval()
    path = tmp_path / "b0.safetensors"
    save_file(model.state_dict(), str(path))
    again = lowformer.create_model("lowformer_b0", checkpoint_path=path).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("lowformer_b0", checkpoint_path=path)
    assert "safetensors" in _one_line(e)


def _save_pt(tmp_path, sd):
    path = tmp_path / "evalmodel.pt"
    torch.save(sd, path)
    return path


def test_no_tensors_in_file(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "notes": "nothing"}, path)
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("lowformer_b0", checkpoint_path=path)
    assert "no state dict" in _one_line(e)


def test_pretrained_reads_local_weights_folder(tmp_path, monkeypatch, b0_state):
    monkeypatch.setenv("LOWFORMER_WEIGHTS", str(tmp_path))
    # timm publishes LowFormer-B0; with an empty offline Hugging Face cache it cannot be had either.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("lowformer_b0", pretrained=True)
    msg = _one_line(e)
    assert str(tmp_path / "lowformer_b0") in msg and "published weights" in msg
    torch.save(b0_state, tmp_path / "lowformer_b0.pth")
    model = lowformer.create_model("lowformer_b0", pretrained=True)
    torch.testing.assert_close(model.classifier.bias, b0_state["head.op_list.3.linear.bias"])


def test_default_weights_folder_is_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWFORMER_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lowformer.weights_dir() == tmp_path / "lowformer" / "weights"


def test_ddp_prefix_is_removed(tmp_path, b0_state):
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in b0_state.items()}}, path)
    lowformer.create_model("lowformer_b0", checkpoint_path=path)


def test_plain_pickle_would_execute_payload(tmp_path):
    """Guards the exploit test above: the payload does run when unpickled without protection."""
    marker = tmp_path / "ran"
    exploit = _Exploit()
    exploit.marker = marker
    pickle.loads(pickle.dumps(exploit))
    assert marker.exists()


def test_no_weights_anywhere_names_the_file_to_put(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWFORMER_WEIGHTS", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        lowformer.create_model("edgevit_xxs", pretrained=True)
    msg = _one_line(e)
    assert "timm publishes none" in msg and str(tmp_path / "edgevit_xxs") in msg


def _read_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        lowformer.read_checkpoint(path)
    text = _one_line(e)
    assert text.startswith("Checkpoint '") and text.endswith(".") and str(path) in text
    assert "refused" not in text  # a file that is not a checkpoint is no security verdict
    return text


def test_random_bytes_are_not_a_pytorch_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(7, 256)) * 40)
    assert "is not a PyTorch checkpoint" in _read_error(path)


def test_json_is_not_a_pytorch_checkpoint(tmp_path):
    path = tmp_path / "config.pt"
    path.write_text('{"architecture": "lowformer_b0"}')
    assert "is not a PyTorch checkpoint: it is a JSON or text file" in _read_error(path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is not a PyTorch checkpoint: it is an empty file" in _read_error(tmp_path / "empty.pt")


def test_safetensors_under_another_name_says_so(tmp_path, b0_state):
    path = tmp_path / "weights.pt"
    save_file(b0_state, path)
    assert "is a safetensors file; name it 'weights.safetensors'" in _read_error(path)
    path.rename(tmp_path / "weights.safetensors")
    assert set(lowformer.read_checkpoint(tmp_path / "weights.safetensors")) == set(b0_state)


def test_directory_is_named_a_directory(tmp_path):
    assert "is a directory, not a file" in _read_error(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert f"local-dir:{tmp_path}" in _read_error(tmp_path)
