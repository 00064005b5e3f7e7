"""One flag vocabulary: every alias of every subcommand, both spellings of every long flag, --version,
subcommand usage on unknown flags, one-line value errors.

ALIASES is the one table of spellings: a subcommand's owner adds rows for its own flags here."""
from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

from lowformer import __version__
from lowformer.cli import build_parser, main
from lowformer.cli._args import swapped_spelling

# (subcommand, arguments, destination, parsed value). Required positionals are part of the arguments.
ALIASES = [
    # eval: the original's underscores, timm's validate.py short flags and names
    ("eval", ["--batch-size", "7"], "batch_size", 7),
    ("eval", ["--batch_size", "7"], "batch_size", 7),
    ("eval", ["-b", "7"], "batch_size", 7),
    ("eval", ["--workers", "3"], "workers", 3),
    ("eval", ["-j", "3"], "workers", 3),
    ("eval", ["--image-size", "32"], "image_size", 32),
    ("eval", ["--image_size", "32"], "image_size", 32),
    ("eval", ["--img-size", "32"], "image_size", 32),
    ("eval", ["--img_size", "32"], "image_size", 32),
    ("eval", ["--crop-ratio", "0.9"], "crop_ratio", 0.9),
    ("eval", ["--crop_ratio", "0.9"], "crop_ratio", 0.9),
    ("eval", ["--crop-pct", "0.9"], "crop_ratio", 0.9),
    ("eval", ["--crop_pct", "0.9"], "crop_ratio", 0.9),
    ("eval", ["--amp"], "amp", True),
    ("eval", ["--num-classes", "10"], "num_classes", 10),
    ("eval", ["--num_classes", "10"], "num_classes", 10),
    ("eval", ["--class_map", "c.tsv"], "class_map", "c.tsv"),
    ("eval", ["--data-dir", "val"], "data", "val"),
    ("eval", ["--data_dir", "val"], "data", "val"),
    ("eval", ["-m", "lowformer_b0"], "model_flag", "lowformer_b0"),
    ("eval", ["--model", "lowformer_b0"], "model_flag", "lowformer_b0"),
    ("eval", ["--no_progress"], "no_progress", True),
    ("eval", ["--batch_size=7"], "batch_size", 7),
    # predict
    ("predict", ["m", "a.jpg", "--topk", "3"], "topk", 3),
    ("predict", ["m", "a.jpg", "--top-k", "3"], "topk", 3),
    ("predict", ["m", "a.jpg", "--top_k", "3"], "topk", 3),
    # models, quickstart
    ("models", ["--image_size", "64"], "image_size", 64),
    ("quickstart", ["--train_epochs", "0"], "train_epochs", 0),
    ("quickstart", ["--train_path", "p"], "train_path", "p"),
    # the shared mechanism on the other helpers' subcommands
    ("train", ["c.yaml", "--path", "r", "--manual_seed", "3"], "manual_seed", 3),
    ("train", ["c.yaml", "--path", "r", "--manual-seed", "3"], "manual_seed", 3),
    ("train", ["c.yaml", "--path", "r", "--stop_after_epochs", "2"], "stop_after_epochs", 2),
    ("train", ["c.yaml", "--path", "r", "--no_progress"], "no_progress", True),
    ("bench", ["m", "--min_time", "2"], "min_run_time", 2.0),
    ("bench", ["m", "--batch_size", "4"], "batch_size", 4),
    ("profile", ["m", "--image-size", "64"], "image_size", 64),
    ("export", ["m", "--out", "x.onnx", "--image_size", "64"], "image_size", 64),
    ("export", ["m", "--out", "x.onnx", "--calibration_count", "8"], "calibration_count", 8),
]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command, argv, dest, value", ALIASES,
                         ids=[f"{c}:{' '.join(a)}" for c, a, _, _ in ALIASES])
def test_alias_parses_to_the_canonical_flag(parser, command, argv, dest, value):
    if command not in _subparsers(parser):
        pytest.skip(f"no {command} subcommand on this branch")
    args, extra = parser.parse_known_args([command, *argv])
    assert extra == [] and getattr(args, dest) == value


def test_every_long_flag_of_every_subcommand_takes_both_spellings(parser):
    checked = 0
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            for flag in action.option_strings:
                other = swapped_spelling(flag)
                if other is None:
                    continue
                # The other spelling is either registered for the same argument or mapped onto it.
                target = sub._option_string_actions.get(sub._canonical(other))
                assert target is action, f"lowformer {name}: {other} does not mean {flag}"
                checked += 1
    assert checked >= 25  # every subcommand has multi-word flags


def test_dotted_config_overrides_are_left_as_written(parser):
    args, extra = parser.parse_known_args(["train", "c.yaml", "--path", "r", "--run_config.n_epochs", "5"])
    assert extra == ["--run_config.n_epochs", "5"] and args.path == "r"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"lowformer {__version__}" in out and torch.__version__ in out and timm.__version__ in out


def test_unknown_flag_prints_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "lowformer_b0", "--data", "x", "--bogus-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lowformer eval") and "--run RUN_DIR" in err
    assert "unrecognized arguments: --bogus-flag" in err and "COMMAND" not in err


@pytest.mark.parametrize("argv, flag", [
    (["eval", "m", "--data", "d", "--batch_size", "0"], "--batch-size"),
    (["eval", "m", "--data", "d", "-b", "-3"], "--batch-size"),
    (["eval", "m", "--data", "d", "--image-size", "0"], "--image-size"),
    (["eval", "m", "--data", "d", "--num-classes", "0"], "--num-classes"),
    (["eval", "m", "--data", "d", "--crop-pct", "0"], "--crop-ratio"),
    (["eval", "m", "--data", "d", "--crop-ratio", "1.5"], "--crop-ratio"),
    (["eval", "m", "--data", "d", "-j", "-1"], "--workers"),
    (["predict", "m", "a.jpg", "--topk", "0"], "--topk"),
    (["quickstart", "--threads", "0"], "--threads"),
])
def test_zero_and_negative_values_are_refused_in_one_line(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and flag in err and "expected" in err


def test_models_finds_the_original_name(capsys):
    assert main(["models", "mobilevigm", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["mobilevig_m"] and rows[0]["params"] > 1e6
