"""End-to-end training through the CLI on a tiny dataset written by the test."""

import json

import keras
import numpy as np
import pytest
import soundfile as sf
import yaml

from birdnet_stm32.cli import main
from birdnet_stm32.config import Config
from birdnet_stm32.training.trainer import train

SR = 8000
TINY = {
    "audio": {"sample_rate": SR, "chunk_duration": 0.5, "n_fft": 128, "spec_width": 16, "n_mels": 16,
              "fmin": 100.0, "fmax": 4000.0, "frontend": "mel"},
    "data": {"workers": 1, "val_fraction": 0.34, "mixup_alpha": 0.0, "time_masks": 0, "freq_masks": 0, "gain_db": 0.0},
    "model": {"alpha": 0.25, "depth": 1, "se": False, "residual": False},
    "train": {"epochs": 2, "batch_size": 16, "patience": 0, "lr_finder": {"num_steps": 40, "min_lr": 1e-3,
              "max_lr": 10.0}},
}  # fmt: skip


def write_dataset(root, classes=("alpha", "beta", "gamma"), files_per_class=10, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(1.0 * SR)) / SR
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(files_per_class):
            f0 = 500 * (k + 1) + rng.uniform(-50, 50)
            y = 0.5 * np.sin(2 * np.pi * f0 * t * (1 + 0.1 * k * t)) + 0.05 * rng.standard_normal(t.size)
            sf.write(root / name / f"{name}_{i}.wav", y.astype(np.float32), SR)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture()
def tiny_config(tmp_path, monkeypatch):
    monkeypatch.setenv("BIRDNET_STM32_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_train_find_lr_writes_every_file_and_feeds_the_schedule(dataset, tiny_config, tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--data", str(dataset), "--out", str(run), "--config", str(tiny_config), "--find-lr",
                 "--seed", "3"])  # fmt: skip
    assert code == 0
    for name in ("model.keras", "model_config.json", "labels.txt", "config.yaml", "history.csv", "curves.png",
                 "lr_finder.csv", "lr_finder.json", "lr_finder.png"):  # fmt: skip
        assert (run / name).is_file(), name
    info = json.loads((run / "model_config.json").read_text())
    found = info["lr_finder"]["found_lr"]
    assert found is not None and info["lr_finder"]["peak_lr"] == found
    assert json.loads((run / "lr_finder.json").read_text())["probes"] is None  # only a constant LR is probed
    assert info["labels"] == ["alpha", "beta", "gamma"] == (run / "labels.txt").read_text().split()
    assert info["frontend"] and info["summary"]["params"] > 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(found) and saved["train"]["find_lr"] is True
    # The optimizer that trained really used a schedule whose peak is the found LR.
    last = keras.saving.load_model(run / "checkpoint" / "last.keras", safe_mode=True)
    assert last.optimizer._learning_rate.peak_lr == pytest.approx(found)
    rows = (run / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,lr,") and len(rows) == 3
    model = keras.saving.load_model(run / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 3)


def test_find_lr_command_prints_the_suggestions_and_probes_the_constant_lr(dataset, tiny_config, tmp_path, capsys):
    out = tmp_path / "lr"
    code = main(["find-lr", "--data", str(dataset), "--out", str(out), "--config", str(tiny_config),
                 "--probe-steps", "8"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and (out / "lr_finder.csv").is_file() and (out / "lr_finder.png").is_file()
    saved = json.loads((out / "lr_finder.json").read_text())
    assert saved["probes"]["steps"] == 8 and saved["recommended_lr"] == saved["probes"]["picked"]
    assert saved["probes"]["lrs"][0] == saved["suggestions"]["valley"]
    for text in ("valley", "divergence", "constant-LR probes (8 steps", "recommended constant LR", "schedule peak LR"):
        assert text in printed, text


def test_constant_schedule_trains_at_the_probed_constant_lr(dataset, tiny_config, tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--data", str(dataset), "--out", str(run), "--config", str(tiny_config), "--find-lr",
                 "--schedule", "constant", "--probe-steps", "8", "--epochs", "1"])  # fmt: skip
    assert code == 0
    probes = json.loads((run / "lr_finder.json").read_text())["probes"]
    found = json.loads((run / "model_config.json").read_text())["lr_finder"]["found_lr"]
    assert probes["picked"] is not None and found == pytest.approx(probes["picked"])


def test_same_seed_gives_same_weights(dataset, tiny_config, tmp_path):
    cfg = Config.load(tiny_config)
    cfg.train.epochs = 1
    a = train(cfg, dataset, tmp_path / "a")
    b = train(cfg, dataset, tmp_path / "b")
    wa = keras.saving.load_model(a.run_dir / "checkpoint" / "last.keras").get_weights()
    wb = keras.saving.load_model(b.run_dir / "checkpoint" / "last.keras").get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


def test_resume_continues_with_optimizer_state_and_schedule_position(dataset, tiny_config, tmp_path):
    cfg = Config.load(tiny_config)
    cfg.train.epochs = 1
    cfg.train.lr = 0.01
    first = train(cfg, dataset, tmp_path / "run")
    last = keras.saving.load_model(first.run_dir / "checkpoint" / "last.keras")
    steps = int(last.optimizer.iterations)
    assert steps > 0
    # Extend the interrupted run to two epochs and resume it.
    saved = Config.load(first.run_dir / "config.yaml")
    saved.train.epochs = 2
    saved.save(first.run_dir / "config.yaml")
    assert main(["train", "--resume", str(first.run_dir)]) == 0
    resumed = keras.saving.load_model(first.run_dir / "checkpoint" / "last.keras")
    assert int(resumed.optimizer.iterations) == 2 * steps
    history = (first.run_dir / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in history[1:]] == ["1", "2"]


def test_mirrored_strategy_trains_with_find_lr(dataset, tiny_config, tmp_path):
    import tensorflow as tf

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices (tests/conftest.py)")
    run = tmp_path / "mirrored"
    code = main(["train", "--data", str(dataset), "--out", str(run), "--config", str(tiny_config),
                 "--strategy", "mirrored", "--find-lr", "--epochs", "1"])  # fmt: skip
    assert code == 0
    assert (run / "model.keras").is_file() and (run / "lr_finder.json").is_file()


def test_bad_sweep_stops_unless_lr_gives_a_fallback(dataset, tiny_config, tmp_path, capsys):
    too_low = ["--min-lr", "1e-12", "--max-lr", "1e-11", "--epochs", "1"]
    args = ["train", "--data", str(dataset), "--config", str(tiny_config), "--find-lr", *too_low]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--find-lr" in err and "--lr" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--lr", "0.003"]) == 0
    info = json.loads((tmp_path / "b" / "model_config.json").read_text())
    assert info["lr_finder"]["peak_lr"] == 0.003


def test_bad_data_gives_clear_errors(tmp_path, tiny_config, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "nope" in capsys.readouterr().err
    one = write_dataset(tmp_path / "one", classes=("solo",), files_per_class=2)
    assert main(["train", "--data", str(one), "--out", str(tmp_path / "r"), "--config", str(tiny_config)]) == 2
    assert "class" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "r2")]) == 2
    assert "resume" in capsys.readouterr().err


def test_mixed_noise_chunks_keep_their_uniform_share_of_the_target():
    """Softmax targets of the training pipeline are distributions even when mixup blends in a noise chunk."""
    from birdnet_stm32.data.dataset import Features
    from birdnet_stm32.training.trainer import _train_dataset, class_weights

    n, classes = 64, 4
    y = np.zeros((n, classes), np.float32)
    y[: n // 2, 0] = 1.0  # half species "a", half "no species" rows
    features = Features(np.random.default_rng(0).random((n, 8, 8, 1), np.float32), y, np.arange(n),
                        [f"{i}.wav" for i in range(n)], ["a", "b", "c", "d"])  # fmt: skip
    cfg = Config.from_dict({"data": {"mixup_alpha": 1.0, "time_masks": 0, "freq_masks": 0, "gain_db": 0.0},
                            "train": {"batch_size": 32}})  # fmt: skip
    x_b, t_b, w_b = next(iter(_train_dataset(cfg, features, class_weights(y))))
    t_b = t_b.numpy()
    np.testing.assert_allclose(t_b.sum(axis=1), 1.0, atol=1e-5)
    # Mixed species/noise rows exist and give the other classes the noise's uniform share.
    mixed = (t_b[:, 0] > 0.3) & (t_b[:, 0] < 0.9)
    assert mixed.any()
    np.testing.assert_allclose(t_b[mixed, 1], (1 - t_b[mixed, 0]) / 3, atol=1e-5)
    assert w_b.shape == (32,) and np.all(w_b.numpy() > 0)

    cfg.model.multi_label = True  # sigmoid models learn "all outputs low" from all-zero rows
    _, t_multi, _ = next(iter(_train_dataset(cfg, features, class_weights(y))))
    assert t_multi.numpy()[:, 1:].max() == 0.0
