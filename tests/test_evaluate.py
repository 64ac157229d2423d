"""``birdnet-stm32 evaluate`` end to end on a tiny real run: Keras and TFLite, report, plot and user errors."""

import contextlib
import io
import json

import numpy as np
import pytest
import soundfile as sf
from sklearn import metrics as skm

from birdnet_stm32.cli import main
from birdnet_stm32.config import AudioConfig, Config, DataConfig, ModelConfig
from birdnet_stm32.evaluation.evaluate import CONFUSION_FILE, REPORT_FILE, evaluate_model, resolve_model
from birdnet_stm32.evaluation.pooling import METHODS, pool_by_group
from birdnet_stm32.run import LABELS_FILE, MODEL_CONFIG_FILE, save_model_config

LABELS = ["robin", "tit", "wren"]
SR = 8000


def _write_dataset(root, seed=0, extra_classes=()):
    """Two recordings per class (tones at class-specific pitches in noise), one noise recording, one broken file."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(2.5 * SR)) / SR
    for c, name in enumerate([*LABELS, *extra_classes]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            tone = 0.5 * np.sin(2 * np.pi * (600 + 700 * c + 50 * i) * t)
            sf.write(root / name / f"{name}_{i}.wav", (tone + 0.05 * rng.normal(size=t.size)).astype(np.float32), SR)
    (root / "noise").mkdir()
    sf.write(root / "noise" / "field.wav", (0.05 * rng.normal(size=t.size)).astype(np.float32), SR)
    (root / "wren" / "broken.wav").write_bytes(b"RIFF not really a wav file")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder as ``train`` writes it around a tiny DS-CNN, plus a labelled dataset.

    The model is not trained; one forward pass in training mode with BatchNormalization momentum ~0 sets the
    moving statistics to the data's, so the untrained network gives distinct, input-dependent scores (with the
    initial statistics the signal fades through the blocks and every chunk scores 1/3 per class).
    """
    import keras

    from birdnet_stm32.data.dataset import discover, load_features
    from birdnet_stm32.models import build_model

    base = tmp_path_factory.mktemp("eval")
    cfg = Config(
        audio=AudioConfig(sample_rate=SR, chunk_duration=1.0, n_fft=256, spec_width=32, n_mels=32, fmax=4000.0),
        data=DataConfig(cache_dir=str(base / "cache"), workers=1),
        model=ModelConfig(alpha=0.25, se=False, dropout=0.0, bn_momentum=0.01),
    ).validate()
    data = _write_dataset(base / "data")
    keras.utils.set_random_seed(0)
    model = build_model(cfg.audio, cfg.model, num_classes=len(LABELS))
    model(load_features(discover(data), cfg.audio, cfg.data, progress=False).x, training=True)
    run = base / "run"
    run.mkdir()
    model.save(run / "model.keras")
    cfg.save(run / "config.yaml")
    (run / LABELS_FILE).write_text("\n".join(LABELS) + "\n")
    save_model_config(run, {"labels": LABELS, "audio": cfg.to_dict()["audio"], "model": cfg.to_dict()["model"]})
    return run, data, model


def _run_cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def _keras_chunk_scores(model, run, data):
    """The scores the Keras model gives the dataset's chunks, computed independently of evaluate.py."""
    from birdnet_stm32.data.dataset import discover, load_features
    from birdnet_stm32.run import open_run

    cfg = open_run(run).config
    features = load_features(discover(data, classes=LABELS), cfg.audio, cfg.data, progress=False)
    return features, model.predict(features.x, verbose=0)


def test_evaluate_keras_run_via_cli_writes_report_and_plot(tiny_run, capsys):
    run, data, model = tiny_run
    assert main(["evaluate", "--model", str(run), "--data", str(data)]) == 0
    report = json.loads((run / REPORT_FILE).read_text())
    assert next(iter(report)) == "accuracy"
    assert (run / CONFUSION_FILE).read_bytes()[:4] == b"\x89PNG"
    assert "file/lme" in capsys.readouterr().out

    assert report["model"]["type"] == "keras" and report["labels"] == LABELS
    assert report["counts"]["files"] == 7 and report["counts"]["noise_files"] == 1
    assert report["counts"]["skipped_files"] == 1 and report["skipped_files"][0].endswith("broken.wav")
    assert set(report["file"]) == set(METHODS)

    # the numbers are the ones scikit-learn gives for the model's own scores
    features, scores = _keras_chunk_scores(model, run, data)
    assert scores.std(axis=0).min() > 0.01  # input-dependent scores, not a constant model
    labeled = features.y.any(axis=1)
    chunk = report["chunk"]
    assert chunk["n_examples"] == len(features) == report["counts"]["chunks"]
    assert chunk["n_noise"] == report["counts"]["noise_chunks"] == int((~labeled).sum()) > 0
    assert report["accuracy"] == chunk["accuracy"]
    assert chunk["accuracy"] == pytest.approx(
        skm.accuracy_score(features.y[labeled].argmax(1), scores[labeled].argmax(1)), abs=1e-9
    )
    assert chunk["roc_auc"] == pytest.approx(skm.roc_auc_score(features.y, scores, average="macro"), abs=1e-5)
    for c, label in enumerate(LABELS):
        ap = skm.average_precision_score(features.y[:, c], scores[:, c])
        assert chunk["per_class"][label]["ap"] == pytest.approx(ap, abs=1e-5)

    file_scores, _ = pool_by_group(scores, features.groups, "max")
    file_true, _ = pool_by_group(features.y, features.groups, "max")
    assert report["file"]["max"]["n_examples"] == 7
    assert report["file"]["max"]["cmap"] == pytest.approx(
        skm.average_precision_score(file_true, file_scores, average="macro"), abs=1e-5
    )
    counts = np.array(report["confusion_matrix"]["counts"])
    assert counts.shape == (4, 3) and counts.sum() == len(features)
    assert report["confusion_matrix"]["rows"][-1] == "(no species)"


@pytest.mark.slow
def test_float_tflite_gives_the_same_report_as_keras(tiny_run, tmp_path):
    import tensorflow as tf

    run, data, model = tiny_run
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):
        (run / "model_float.tflite").write_bytes(converter.convert())

    keras_report = evaluate_model(run / "model.keras", data, out_dir=tmp_path / "keras")
    tflite_report = evaluate_model(run / "model_float.tflite", data, out_dir=tmp_path / "tflite", batch_size=5)
    assert (tmp_path / "tflite" / REPORT_FILE).is_file() and (tmp_path / "tflite" / CONFUSION_FILE).is_file()
    assert tflite_report["model"]["type"] == "tflite"

    def numbers(section):
        return {k: v for k, v in section.items() if k != "per_class"}

    assert keras_report.keys() == tflite_report.keys()
    for level in ["chunk", *(f"file.{m}" for m in METHODS)]:
        keras_section, tflite_section = keras_report, tflite_report
        for key in level.split("."):
            keras_section, tflite_section = keras_section[key], tflite_section[key]
        assert numbers(keras_section) == pytest.approx(numbers(tflite_section), abs=1e-4), level
        for label in LABELS:
            assert keras_section["per_class"][label] == pytest.approx(tflite_section["per_class"][label], abs=1e-4)


def test_out_folder_and_keras_file_path(tiny_run, tmp_path):
    run, data, _ = tiny_run
    code, err = _run_cli("evaluate", "--model", str(run / "model.keras"), "--data", str(data),
                         "--out", str(tmp_path / "out"), "--batch-size", "4")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["model"]["run"] == str(run) and (tmp_path / "out" / CONFUSION_FILE).is_file()


def test_resolve_model_kinds(tiny_run, tmp_path):
    run, _, _ = tiny_run
    assert resolve_model(run) == (run / "model.keras", "keras", run)
    (tmp_path / "m.tflite").write_bytes(b"")
    assert resolve_model(tmp_path / "m.tflite") == (tmp_path / "m.tflite", "tflite", tmp_path)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda tmp, run: tmp / "nope", "does not exist"),
        (lambda tmp, run: _touch(tmp / "model.onnx"), "expected a run folder, a .keras or a .tflite file"),
        (lambda tmp, run: _mkdir(tmp / "empty"), "folder has no model.keras"),
        (lambda tmp, run: _touch(tmp / "lonely.tflite"), f"no {MODEL_CONFIG_FILE}"),
    ],
    ids=["missing", "wrong-suffix", "folder-without-model", "tflite-outside-run"],
)
def test_bad_model_path_is_a_one_line_user_error(tiny_run, tmp_path, setup, expected):
    run, data, _ = tiny_run
    code, err = _run_cli("evaluate", "--model", str(setup(tmp_path, run)), "--data", str(data))
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1, err


def test_data_class_unknown_to_the_model_is_named(tiny_run, tmp_path):
    run, _, _ = tiny_run
    data = _write_dataset(tmp_path / "data", extra_classes=["owl"])
    code, err = _run_cli("evaluate", "--model", str(run), "--data", str(data))
    assert code == 2 and "owl" in err and len(err.strip().splitlines()) == 1, err


def test_corrupt_keras_file_is_a_user_error(tiny_run, tmp_path):
    run, data, _ = tiny_run
    fake_run = tmp_path / "run"
    fake_run.mkdir()
    for name in ("config.yaml", MODEL_CONFIG_FILE, LABELS_FILE):
        (fake_run / name).write_bytes((run / name).read_bytes())
    (fake_run / "model.keras").write_bytes(b"not a zip")
    code, err = _run_cli("evaluate", "--model", str(fake_run), "--data", str(data))
    assert code == 2 and "not a loadable Keras model" in err, err


def _touch(path):
    path.write_bytes(b"")
    return path


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("layout", ["empty", "class-folder-without-audio"])
def test_data_folder_without_audio_is_a_user_error(tiny_run, tmp_path, layout):
    run, _, _ = tiny_run
    (tmp_path / "data").mkdir()
    if layout != "empty":
        (tmp_path / "data" / "robin").mkdir()
        (tmp_path / "data" / "robin" / "notes.txt").write_text("no audio here")
    code, err = _run_cli("evaluate", "--model", str(run), "--data", str(tmp_path / "data"))
    assert code == 2 and "no audio file" in err and len(err.strip().splitlines()) == 1, err
