"""CLI parsing and config handling: no TensorFlow needed."""

import subprocess
import sys
import time

import pytest
import yaml

from birdnet_stm32.cli import build_config, build_parser, main, setting_help
from birdnet_stm32.config import Config
from birdnet_stm32.errors import UserError


def test_help_is_fast_and_does_not_import_tensorflow():
    code = (
        "import sys, contextlib, io\n"
        "from birdnet_stm32.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported by --help'\n"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    assert time.perf_counter() - t0 < 2.0
    out = subprocess.run([sys.executable, "-m", "birdnet_stm32", "--help"], capture_output=True, text=True, check=True)
    for command in ("make-demo-data", "find-lr", "train", "export", "evaluate", "demo"):
        assert command in out.stdout


def test_train_help_shows_defaults_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--data",
        "--val-data",
        "--out",
        "--config",
        "--epochs",
        "--batch-size",
        "--lr",
        "--find-lr",
        "--schedule",
        "--optimizer",
        "--frontend",
        "--seed",
        "--strategy",
        "--resume",
    ):
        assert flag in text
    default, _, _ = setting_help("train.epochs")
    assert f"(default: {default})" in text


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 7, "batch_size": 8}, "audio": {"frontend": "mel"}}))
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--config", str(path), "--epochs", "3"])
    cfg = build_config(args)
    assert cfg.train.epochs == 3  # flag wins
    assert cfg.train.batch_size == 8  # file wins over default
    assert cfg.audio.frontend == "mel"
    assert cfg.train.seed == Config().train.seed  # default


def test_find_lr_switch_and_nested_setting(tmp_path):
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--find-lr", "--num-steps", "50"])
    cfg = build_config(args)
    assert cfg.train.find_lr is True
    assert cfg.train.lr_finder.num_steps == 50


@pytest.mark.parametrize("steps", [3, -1, 2.5, True])
def test_bad_probe_steps_are_refused(steps):
    from birdnet_stm32.config import LRFinderConfig
    from birdnet_stm32.errors import UserError

    with pytest.raises(UserError, match="probe_steps"):
        LRFinderConfig(probe_steps=steps).validate()
    LRFinderConfig(probe_steps=0).validate()  # off


def test_config_round_trip(tmp_path):
    cfg = Config()
    cfg.train.epochs = 11
    cfg.model.alpha = 0.75
    cfg.train.lr_finder.max_lr = 0.5
    cfg.save(tmp_path / "config.yaml")
    again = Config.load(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train": {"epoch": 3}}, "unknown setting 'train.epoch'"),
        ({"model": {"alpha": "wide"}}, "model.alpha='wide': expected float"),
        ({"audio": {"fmax": 20000.0}}, "audio.fmax=20000.0"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_config_file_gives_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err


def test_bad_flag_values_are_user_errors():
    for argv in (["--schedule", "linear"], ["--epochs", "0"], ["--optimizer", "lion"], ["--strategy", "tpu"]):
        args = build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv])
        with pytest.raises(UserError, match=argv[0]):
            build_config(args)


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--data", "d", "--out", "o", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
