"""The int8 exporter end to end on a real tiny trained run, its parts, and its errors."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import yaml

keras = pytest.importorskip("keras")

from birdnet_stm32.audio.features import frontend_contract  # noqa: E402
from birdnet_stm32.cli import main  # noqa: E402
from birdnet_stm32.config import AudioConfig, Config, DataConfig, ExportConfig, ModelConfig, TrainConfig  # noqa: E402
from birdnet_stm32.data.dataset import prepare_datasets  # noqa: E402
from birdnet_stm32.errors import UserError  # noqa: E402
from birdnet_stm32.export.audit import audit_tflite  # noqa: E402
from birdnet_stm32.export.quantize import (  # noqa: E402
    calibration_indices,
    export_run,
    quantize_model,
    static_batch_model,
)
from birdnet_stm32.export.tflite_model import TFLiteModel  # noqa: E402
from birdnet_stm32.export.validate import check_fidelity, output_agreement  # noqa: E402
from birdnet_stm32.models import build_dscnn, build_model, model_summary  # noqa: E402
from birdnet_stm32.run import LABELS_FILE, MODEL_CONFIG_FILE, save_model_config  # noqa: E402

SR = 8000
CLASSES = ("finch", "thrush", "wren")


def write_dataset(root, classes=CLASSES, files_per_class=6, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(1.5 * SR)) / SR
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(files_per_class):
            f0 = 600 * (k + 1) + rng.uniform(-60, 60)
            y = 0.5 * np.sin(2 * np.pi * f0 * t * (1 + 0.15 * t)) + 0.05 * rng.standard_normal(t.size)
            sf.write(root / name / f"{name}_{i}.wav", (y * rng.uniform(0.2, 1.0)).astype(np.float32), SR)
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real run folder: a tiny model trained on real WAV files, saved the way the trainer saves it."""
    base = tmp_path_factory.mktemp("export")
    data = write_dataset(base / "data")
    cfg = Config(
        audio=AudioConfig(sample_rate=SR, chunk_duration=0.5, n_fft=64, spec_width=32, n_mels=16, fmin=100.0,
                          fmax=3900.0, frontend="mel"),
        data=DataConfig(val_fraction=0.34, workers=1, cache_dir=str(base / "cache")),
        model=ModelConfig(alpha=0.5, depth=1, dropout=0.0, bn_momentum=0.9),
        train=TrainConfig(seed=0),
    )  # fmt: skip
    train, val = prepare_datasets(data, cfg.audio, cfg.data, seed=cfg.train.seed)
    keras.utils.set_random_seed(0)
    model = build_model(cfg.audio, cfg.model, len(train.classes))
    model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy", jit_compile=False)
    model.fit(train.x, train.y, batch_size=12, epochs=20, verbose=0)
    run = base / "run"
    run.mkdir()
    model.save(run / "model.keras")
    cfg.save(run / "config.yaml")
    (run / LABELS_FILE).write_text("\n".join(train.classes) + "\n")
    save_model_config(run, {
        "labels": list(train.classes),
        "audio": dataclasses.asdict(cfg.audio),
        "frontend": frontend_contract(cfg.audio),
        "model": dataclasses.asdict(cfg.model),
        "summary": model_summary(model),
        "data": {"train_dir": str(data), "val_dir": None, "seed": 0, "val_fraction": 0.34},
    })  # fmt: skip
    return {"run": run, "data": data, "model": model, "train": train, "val": val, "base": base}


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_export_writes_a_passing_int8_model_report_and_metadata(trained_run, capsys):
    run = trained_run["run"]
    code = main(["export", "--run", str(run), "--calibration-samples", "30"])
    report = json.loads((run / "export_report.json").read_text())
    assert code == 0 and report["passed"], report["failures"]
    tflite_path = run / "model_int8.tflite"
    assert tflite_path.is_file() and report["model_path"] == str(tflite_path)
    assert report["overrides"] == {"--calibration-samples": 30}

    # the flatbuffer: int8 builtins only, static batch 1, float32 I/O, audit clean
    tflite = report["tflite"]
    assert tflite["inputs"][0]["dtype"] == "float32" and tflite["inputs"][0]["shape"] == [1, 16, 32, 1]
    assert tflite["inputs"][0]["int8_quantization"]["scale"] > 0
    assert tflite["size_bytes"] == tflite_path.stat().st_size and tflite["peak_activation_bytes"] > 0
    assert report["audit"]["passed"] and audit_tflite(tflite_path).passed
    assert tflite["op_counts"]["CONV_2D"] >= 3

    # calibration: from the training split, every class, several recordings
    calib = report["calibration"]
    assert calib["chunks"] == 30 and set(calib["per_class"]) == set(CLASSES) and min(calib["per_class"].values()) >= 9
    assert calib["recordings"] == len(trained_run["train"].files)

    # fidelity on the validation split, metrics side by side
    fid = report["fidelity"]
    assert fid["examples"] == len(trained_run["val"])
    assert fid["top1_agreement"] >= 0.95 and fid["cosine_mean"] >= 0.95
    acc = fid["metrics"]["accuracy"]
    assert acc["keras"] >= 0.9 and acc["diff"] == pytest.approx(acc["tflite"] - acc["keras"])
    assert set(fid["metrics"]) == {"accuracy", "macro_roc_auc", "cmap"}

    # what the MCU needs, beside the model
    meta = json.loads((run / "model_int8.json").read_text())
    assert meta["labels"] == list(CLASSES) and meta["output_activation"] == "softmax"
    assert meta["frontend"]["sample_rate"] == SR and meta["frontend"]["stft"]["n_fft"] == 64
    assert meta["input"]["int8_quantization"] == tflite["inputs"][0]["int8_quantization"]
    assert meta["model_file"] == "model_int8.tflite" and len(meta["sha256"]) == 64

    # the exported file reproduces the Keras model, and uses per-channel weights by default
    val = trained_run["val"]
    agreement = output_agreement(
        trained_run["model"].predict(val.x, verbose=0), TFLiteModel(tflite_path).predict(val.x)
    )
    assert agreement["top1_agreement"] == fid["top1_agreement"]
    audit = audit_tflite(tflite_path)
    convs = [op for op in audit.ops if op.name == "CONV_2D"]
    assert max(len(audit.tensors[op.inputs[1]].scale) for op in convs) > 1

    out = capsys.readouterr().out
    assert "STM32N6 audit: PASSED" in out and "accuracy" in out and "PASSED: wrote" in out


@pytest.mark.slow
def test_missed_threshold_fails_loudly_without_writing_the_model(trained_run, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "n6.tflite"
    cfg = ExportConfig(int8_io=True, per_channel=False, strict=True, calibration_samples=24, min_cosine=1.0)
    report = export_run(trained_run["run"], cfg, out_path=out)  # min_cosine=1: int8 never reproduces float exactly
    assert report["passed"] is False and "export.min_cosine 1.0" in report["failures"][0]
    assert not out.exists() and not out.with_suffix(".json").exists() and report["model_path"] is None
    assert json.loads((out.parent / "export_report.json").read_text()) == json.loads(json.dumps(report))
    assert report["settings"]["int8_io"] and not report["settings"]["per_channel"] and report["settings"]["strict"]
    assert report["calibration"]["chunks"] == 24
    assert report["tflite"]["inputs"][0]["dtype"] == "int8" and report["tflite"]["outputs"][0]["dtype"] == "int8"
    assert "FAILED: cosine similarity" in capsys.readouterr().out


# --- bad input ---------------------------------------------------------------------------------------------------


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_missing_run_and_run_without_model_config(tmp_path, capsys):
    code, err = run_cli(["export", "--run", str(tmp_path / "nope")], capsys)
    assert code == 2 and "run folder does not exist" in err
    (tmp_path / "half").mkdir()
    code, err = run_cli(["export", "--run", str(tmp_path / "half")], capsys)
    assert code == 2 and MODEL_CONFIG_FILE in err and "not a training run" in err


def test_data_with_other_classes_is_refused(trained_run, tmp_path, capsys):
    other = write_dataset(tmp_path / "other", classes=("finch", "thrush", "robin"), files_per_class=2)
    code, err = run_cli(["export", "--run", str(trained_run["run"]), "--data", str(other)], capsys)
    assert code == 2 and "robin" in err and len(err.strip().splitlines()) == 1


def test_features_that_do_not_fit_the_model_are_refused(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["audio"]["n_mels"] = 24  # the features no longer match the model's 16 mel bands
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = run_cli(["export", "--run", str(run)], capsys)
    assert code == 2 and "do not fit the model input" in err and "(16, 32, 1)" in err


def test_run_whose_training_data_is_gone(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    info = json.loads((run / MODEL_CONFIG_FILE).read_text())
    info["data"]["train_dir"] = str(tmp_path / "moved")
    (run / MODEL_CONFIG_FILE).write_text(json.dumps(info))
    code, err = run_cli(["export", "--run", str(run)], capsys)
    assert code == 2 and "no longer exists; pass --data" in err


def test_bad_output_name_and_calibration_size(trained_run, capsys):
    code, err = run_cli(["export", "--run", str(trained_run["run"]), "--out", "model.bin"], capsys)
    assert code == 2 and ".tflite" in err
    code, err = run_cli(["export", "--run", str(trained_run["run"]), "--calibration-samples", "0"], capsys)
    assert code == 2 and "--calibration-samples 0" in err


# --- parts -------------------------------------------------------------------------------------------------------


def test_calibration_is_stratified_spread_over_recordings_and_seeded():
    # class 0: 10 recordings x 5 chunks, class 1: 2 recordings x 5 chunks, plus 5 noise chunks
    groups = np.repeat(np.arange(13), 5)
    y = np.zeros((65, 2))
    y[:50, 0] = 1
    y[50:60, 1] = 1
    picked = calibration_indices(y, groups, 12, seed=1)
    assert len(picked) == 12 and len(set(picked)) == 12
    strata = np.where(y[picked].max(1) > 0, y[picked].argmax(1), -1)
    assert sorted(np.bincount(strata + 1)) == [4, 4, 4]  # noise, class 0, class 1 equally
    assert len(np.unique(groups[picked][strata == 0])) == 4  # four different recordings of class 0
    np.testing.assert_array_equal(picked, calibration_indices(y, groups, 12, seed=1))
    assert not np.array_equal(picked, calibration_indices(y, groups, 12, seed=2))
    assert len(calibration_indices(y, groups, 1000, seed=0)) == 65
    # once every recording gave a chunk, recordings give a second one
    two = calibration_indices(y[50:60], groups[50:60], 4, seed=0)
    assert np.bincount(groups[50:60][two] - 10).tolist() == [2, 2]
    with pytest.raises(UserError, match="calibration_samples"):
        calibration_indices(y, groups, 0, seed=0)


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(1)
    return build_dscnn((16, 16, 1), 3, alpha=0.5, depth=1, stage_channels=(16,))


def test_static_batch_model_copies_weights(tiny_model):
    static = static_batch_model(tiny_model)
    assert tiny_model.input_shape[0] is None and static.input_shape[0] == 1
    x = np.random.default_rng(0).random((1, 16, 16, 1)).astype("float32")
    np.testing.assert_allclose(static.predict(x, verbose=0), tiny_model.predict(x, verbose=0), atol=1e-6)
    assert static_batch_model(static) is static


def test_quantize_model_schemes_and_tflite_model_io(tiny_model):
    x = np.random.default_rng(0).random((12, 16, 16, 1)).astype("float32")
    default_bytes = quantize_model(tiny_model, x, ExportConfig())
    other_bytes = quantize_model(tiny_model, x, ExportConfig(per_channel=False, int8_io=True))
    per_channel, per_tensor = audit_tflite(default_bytes), audit_tflite(other_bytes)
    conv = lambda r: next(op for op in r.ops if op.name == "CONV_2D" and r.tensors[op.outputs[0]].shape[-1] > 1)  # noqa: E731
    assert len(per_channel.tensors[conv(per_channel).inputs[1]].scale) > 1
    assert len(per_tensor.tensors[conv(per_tensor).inputs[1]].scale) == 1

    float_model, int8_model = TFLiteModel(default_bytes), TFLiteModel(other_bytes)
    assert int8_model.input_details["dtype"] == np.int8 and float_model.input_details["dtype"] == np.float32
    assert int8_model.output_details["dtype"] == np.int8
    assert int8_model.input_shape == (16, 16, 1) and int8_model.num_classes == 3
    reference = tiny_model.predict(x, verbose=0)
    for model in (int8_model, float_model):
        scores = model.predict(x)
        assert scores.shape == (12, 3) and scores.dtype == np.float32
        assert output_agreement(reference, scores)["max_abs_diff"] < 0.05
    with pytest.raises(UserError, match="does not match"):
        int8_model.predict(x[:, :8])


def test_quantize_model_rejects_calibration_of_the_wrong_shape(tiny_model):
    with pytest.raises(UserError, match="do not fit the model input"):
        quantize_model(tiny_model, np.zeros((4, 16, 8, 1), "float32"), ExportConfig())


def test_tflite_model_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TFLiteModel(tmp_path / "none.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a loadable TFLite model"):
        TFLiteModel(bad)


def test_output_agreement_and_thresholds():
    ref = np.array([[0.8, 0.2, 0.0], [0.1, 0.7, 0.2], [0.0, 0.0, 0.0]])
    cand = np.array([[0.6, 0.4, 0.0], [0.5, 0.3, 0.2], [0.0, 0.0, 0.0]])
    out = output_agreement(ref, cand)
    cos0 = (0.48 + 0.08) / (np.hypot(0.8, 0.2) * np.hypot(0.6, 0.4))
    cos1 = (0.05 + 0.21 + 0.04) / (np.linalg.norm(ref[1]) * np.linalg.norm(cand[1]))
    assert out["cosine_mean"] == pytest.approx((cos0 + cos1 + 1.0) / 3)
    assert out["cosine_min"] == pytest.approx(cos1)
    assert out["top1_agreement"] == pytest.approx(2 / 3) and out["max_abs_diff"] == pytest.approx(0.4)
    report = {**out, "metrics": {"accuracy": {"diff": -0.05}}}
    failures = check_fidelity(report, ExportConfig(min_cosine=0.5, min_top1_agreement=0.9, max_accuracy_drop=0.03))
    assert len(failures) == 2 and "top-1 agreement" in failures[0] and "accuracy drop 0.0500" in failures[1]
    assert check_fidelity(report, ExportConfig(min_cosine=0.5, min_top1_agreement=0.5, max_accuracy_drop=0.1)) == []
    # The gate reads the agreement on chunks with a species when the report has it: here 1 of 2 labeled rows.
    labeled = {**report, "top1_agreement_labeled": 0.5, "metrics": {"accuracy": {"diff": 0.0}}}
    failures = check_fidelity(labeled, ExportConfig(min_cosine=0.5, min_top1_agreement=0.6))
    assert failures == ["top-1 agreement on chunks with a species 0.5000 < export.min_top1_agreement 0.6"]
    assert (
        check_fidelity({**labeled, "top1_agreement": 0.0}, ExportConfig(min_cosine=0.5, min_top1_agreement=0.5)) == []
    )
