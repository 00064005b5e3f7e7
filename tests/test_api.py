"""Public API and command line: names, listing, errors as one line."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm

import lowformer
from lowformer.cli import main


def test_list_models_is_the_project_not_all_of_timm():
    names = lowformer.list_models()
    assert set(lowformer.models.LOWFORMER_MODELS) <= set(names)
    assert "resnet50" not in names and "lowformer_b2" not in names
    assert lowformer.list_models("lowformer_e*") == ["lowformer_e1", "lowformer_e2", "lowformer_e3"]


def test_create_model_accepts_any_timm_model():
    model = lowformer.create_model("resnet18", num_classes=7)
    assert model.fc.out_features == 7


def test_unknown_model_names_close_matches():
    with pytest.raises(lowformer.UnknownModelError) as e:
        lowformer.create_model("lowformer_b9")
    msg = str(e.value)
    assert "unknown model 'lowformer_b9'" in msg and "lowformer_b0" in msg and "\n" not in msg


def test_timm_create_model_knows_project_models_and_nothing_is_overwritten():
    code = "import warnings; warnings.simplefilter('error'); import timm; import lowformer; print(len(lowformer.list_models()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in lowformer.list_models():
        assert timm.is_model(name)


def test_cli_models_table(capsys):
    assert main(["models", "lowformer_b*"]) == 0
    out = capsys.readouterr().out
    assert "lowformer_b0" in out and "944.0" in out and "6098.7" in out and "224x224" in out
    assert "lowformer_e1" not in out


def test_cli_error_is_one_line_with_status_2(capsys):
    assert main(["models", "nothing_like_this*"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowformer models: error:") and "\n" not in err


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "lowformer", "models", "lowformer_e1"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "1348.2" in result.stdout and "18.90" in result.stdout


def test_quickstart_runs_on_bundled_image(capsys):
    assert main(["quickstart", "--train-epochs", "0"]) == 0
    out = capsys.readouterr().out
    assert "lowformer_b0 on n01440764_tench.jpg" in out and "median" in out and "threads 1" in out


def test_deploy_is_a_callable_package_whose_submodules_import():
    code = ("import lowformer, torch\n"
            "import lowformer.deploy.onnx as m\n"
            "import lowformer.deploy.export as e\n"
            "net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()\n"
            "x = torch.randn(1, 3, 8, 8)\n"
            "print(m.OPSET, callable(e.export_model), torch.allclose(lowformer.deploy(net, x)(x), net(x), atol=1e-5))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1:] == ["True", "True"]
