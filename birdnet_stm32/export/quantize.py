"""Full-integer post-training quantization of a training run for the STM32N6, with audit and fidelity report.

``birdnet-stm32 export --run RUN`` calls :func:`export_run`, which

1. opens the run folder and loads ``model.keras`` (Keras safe mode);
2. loads the run's own train/validation split (the same seed, folders and audio settings as
   training; ``--data DIR`` uses another dataset with the same classes);
3. draws the calibration set from the training split (:func:`calibration_indices`: fixed seed,
   stratified across classes, spread over recordings);
4. rebuilds the model with a static batch of 1 and converts it with ``TFLITE_BUILTINS_INT8`` only
   (:func:`quantize_model`): int8 weights (per-channel unless ``--per-tensor``), int32 biases, int8
   activations, float32 input/output unless ``--int8-io``;
5. audits the flatbuffer for the STM32N6 (:mod:`birdnet_stm32.export.audit`);
6. runs the Keras and the TFLite model on the validation split and compares them
   (:mod:`birdnet_stm32.export.validate`);
7. writes ``model_int8.tflite`` and the MCU metadata ``model_int8.json`` when every check passes,
   and always ``export_report.json``; prints the report as a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from birdnet_stm32.config import DataConfig, ExportConfig
from birdnet_stm32.errors import UserError
from birdnet_stm32.run import MODEL_CONFIG_FILE, TFLITE_FILE, Run, open_run
from birdnet_stm32.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

#: Name of the export report written next to the exported model.
REPORT_FILE = "export_report.json"

#: Version of the layout of the MCU metadata file (``model_int8.json``).
METADATA_VERSION = 1


def calibration_indices(y: np.ndarray, groups: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Pick a calibration set: stratified across classes, spread over recordings, reproducible.

    Classes (and the "no species" rows, as one more stratum) take turns; within a class the
    recordings take turns in a seeded random order, each giving one randomly chosen chunk per
    turn. So ``n`` chunks cover as many classes and recordings as possible, with several chunks
    per recording once every recording of a class has given one.

    Args:
        y: Targets ``(N, C)``; a row's stratum is its arg-max class, or "no species" if all zero.
        groups: Recording index of each row, ``(N,)``.
        n: Number of chunks wanted; all rows are returned when there are fewer.
        seed: Seed of the random choices.

    Returns:
        Sorted row indices, at most ``n`` of them.

    Raises:
        UserError: ``n < 1``.

    Examples:
        >>> y = np.eye(2)[[0, 0, 0, 0, 1, 1]]
        >>> calibration_indices(y, np.array([0, 0, 1, 1, 2, 2]), 4, seed=0).size
        4
    """
    if n < 1:
        raise UserError(f"export.calibration_samples={n}: must be >= 1")
    y = np.asarray(y)
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    strata = np.where(y.max(axis=1) > 0, y.argmax(axis=1), -1)
    queues = []
    for stratum in np.unique(strata):
        rows = np.flatnonzero(strata == stratum)
        per_recording = [rng.permutation(rows[groups[rows] == g]) for g in rng.permutation(np.unique(groups[rows]))]
        queues.append(_interleave(per_recording))
    return np.sort(np.array(_interleave(queues)[:n], dtype=np.int64))


def _interleave(lists: list[Any]) -> list[Any]:
    longest = max((len(items) for items in lists), default=0)
    return [items[i] for i in range(longest) for items in lists if i < len(items)]


def static_batch_model(model: Any) -> Any:
    """Rebuild a functional Keras model on a batch-1 input and copy its weights.

    A TFLite model converted from a dynamic-batch model keeps ``-1`` in its shape signatures; the
    STM32N6 needs every shape fixed.

    Args:
        model: A functional Keras model.

    Returns:
        The same architecture with input batch 1 and the same weights (``model`` itself when its
        batch already is 1).

    Raises:
        UserError: The model is not a single-input functional model.
    """
    import keras

    if model.input_shape[0] == 1:
        return model
    config = model.get_config()
    inputs = [layer for layer in config.get("layers", []) if layer["class_name"] == "InputLayer"]
    if len(inputs) != 1:
        raise UserError(f"model '{model.name}': export needs a functional model with one input")
    batch_shape = inputs[0]["config"]["batch_shape"]
    inputs[0]["config"]["batch_shape"] = [1, *batch_shape[1:]]
    static = keras.Model.from_config(config)
    static.set_weights(model.get_weights())
    return static


def quantize_model(keras_model: Any, representative: np.ndarray, export_cfg: ExportConfig) -> bytes:
    """Convert a Keras model to a full-integer int8 TFLite flatbuffer with a static batch of 1.

    Args:
        keras_model: The trained float model (any batch size; rebuilt with batch 1 here).
        representative: Calibration inputs ``(N, H, W, 1)`` float32, in the model's input units.
        export_cfg: ``per_channel`` and ``int8_io`` select the quantization scheme.

    Returns:
        The ``.tflite`` flatbuffer.

    Raises:
        UserError: The calibration inputs do not fit the model, or the converter cannot quantize
            the model to int8 builtins (its message names the first failing operator).

    Examples:
        >>> tflite_bytes = quantize_model(model, train.x[:300], ExportConfig())  # doctest: +SKIP
    """
    import tensorflow as tf

    model = static_batch_model(keras_model)
    rep = np.asarray(representative, dtype=np.float32)
    expected = tuple(model.input_shape[1:])
    if rep.ndim != 4 or tuple(rep.shape[1:]) != expected or not len(rep):
        raise UserError(
            f"calibration inputs of shape {rep.shape} do not fit the model input (N, {', '.join(map(str, expected))})"
        )

    def representative_dataset() -> Iterator[list[np.ndarray]]:
        for i in range(len(rep)):
            yield [rep[i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter._experimental_disable_per_channel = not export_cfg.per_channel
    if export_cfg.int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with _captured_output() as captured, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Statistics for quantized inputs were expected": calibration provides them
        try:
            return converter.convert()
        except Exception as exc:  # the converter raises several types; all mean "cannot quantize this model"
            error = exc
    reason = _first_error_line(str(error)) or _first_error_line(captured.read()) or type(error).__name__
    raise UserError(f"model '{keras_model.name}': int8 conversion failed: {reason}")


@contextlib.contextmanager
def _captured_output() -> Iterator[Any]:
    """Send everything written to file descriptors 1 and 2 (also by C++ code) into a temporary file."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower() and line.strip():
            return line.strip()[:300]
    return ""


def export_run(
    run_dir: str | Path,
    export_cfg: ExportConfig,
    *,
    data_dir: str | Path | None = None,
    data_cfg: DataConfig | None = None,
    out_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export a training run to an int8 ``.tflite`` for the STM32N6 (the ``export`` command).

    Args:
        run_dir: Run folder written by ``train``.
        export_cfg: Quantization settings and fidelity thresholds.
        data_dir: Dataset root for calibration and validation instead of the run's own data; it
            must have the run's classes.
        data_cfg: Where the feature cache lives and how many workers extract features (``cache_dir``,
            ``workers``); the split and everything else come from the run's own ``config.yaml``.
        out_path: Output ``.tflite`` path (default ``RUN/model_int8.tflite``). The report
            (``export_report.json``) and the MCU metadata (same name, ``.json``) go beside it.
        overrides: Command-line settings that were given, recorded in the report.

    Returns:
        The report (also written as ``export_report.json``); ``report["passed"]`` is ``False``
        when a fidelity threshold is missed or, with ``export_cfg.strict``, the audit found a
        problem. The model and metadata are written only when the export passed.

    Raises:
        UserError: The run folder, its data or the settings are unusable (missing run, no
            ``model_config.json``, data with other classes or another input shape, ...).

    Examples:
        >>> report = export_run("runs/demo", ExportConfig())  # doctest: +SKIP
        >>> report["passed"], report["fidelity"]["top1_agreement"]  # doctest: +SKIP
        (True, 0.998)
    """
    from birdnet_stm32.export.audit import audit_tflite
    from birdnet_stm32.export.tflite_model import TFLiteModel
    from birdnet_stm32.export.validate import check_fidelity, fidelity_report

    export_cfg.validate()
    run = open_run(run_dir)
    out_path = Path(out_path) if out_path is not None else run.path / TFLITE_FILE
    if out_path.suffix != ".tflite":
        raise UserError(f"--out {out_path}: the output file must end in .tflite")
    train, val, sources = _load_split(run, data_dir, data_cfg)
    model = run.load_model()
    _check_features(model, run, train, sources["train"])

    seed = run.config.train.seed
    calib = calibration_indices(train.y, train.groups, export_cfg.calibration_samples, seed)
    log.info(
        "Quantizing with %d calibration chunks from %d recordings", len(calib), len(np.unique(train.groups[calib]))
    )
    start = time.perf_counter()
    tflite = quantize_model(model, train.x[calib], export_cfg)
    conversion_seconds = time.perf_counter() - start

    audit = audit_tflite(tflite)
    log.info("Comparing Keras and TFLite on %d validation chunks", len(val))
    fidelity = fidelity_report(model, TFLiteModel(tflite), val.x, val.y)
    failures = check_fidelity(fidelity, export_cfg)
    if export_cfg.strict and audit.problems:
        failures.append(f"export.strict: the STM32N6 audit found {len(audit.problems)} problem(s)")
    passed = not failures

    metadata_path = out_path.with_suffix(".json")
    tflite_info = audit.to_dict()
    report = {
        "passed": passed,
        "failures": failures,
        "run": str(run.path),
        "model_path": str(out_path) if passed else None,
        "metadata_path": str(metadata_path) if passed else None,
        "settings": {
            "per_channel": export_cfg.per_channel,
            "int8_io": export_cfg.int8_io,
            "calibration_samples": export_cfg.calibration_samples,
            "min_cosine": export_cfg.min_cosine,
            "min_top1_agreement": export_cfg.min_top1_agreement,
            "max_accuracy_drop": export_cfg.max_accuracy_drop,
            "strict": export_cfg.strict,
        },
        "overrides": dict(overrides or {}),
        "calibration": _describe_subset(train, calib, sources["train"], seed),
        "validation": _describe_subset(val, np.arange(len(val)), sources["val"], seed),
        "conversion_seconds": round(conversion_seconds, 3),
        "tflite": {k: v for k, v in tflite_info.items() if k not in ("passed", "problems")},
        "audit": {
            "passed": audit.passed,
            "problems": tflite_info["problems"],
            "allow_list_source": "ST Edge AI Core: ST Neural-ART NPU - Supported operators and limitations",
        },
        "fidelity": fidelity,
    }
    if passed:
        atomic_write_bytes(out_path, tflite)
        metadata = mcu_metadata(run, audit.io_details(), tflite, out_path.name, export_cfg)
        atomic_write_text(metadata_path, json.dumps(metadata, indent=2))
    atomic_write_text(out_path.parent / REPORT_FILE, json.dumps(report, indent=2))
    print(format_report(report))
    return report


def mcu_metadata(
    run: Run, io: dict[str, list[dict[str, Any]]], tflite: bytes, model_file: str, export_cfg: ExportConfig
) -> dict[str, Any]:
    """Everything the microcontroller side needs besides the ``.tflite`` itself.

    Args:
        run: The opened run (labels, audio settings, frontend contract).
        io: Model inputs/outputs from :meth:`~birdnet_stm32.export.audit.AuditReport.io_details`.
        tflite: The flatbuffer (for its size and SHA-256).
        model_file: File name of the ``.tflite`` beside the metadata.
        export_cfg: The quantization settings used.

    Returns:
        A JSON-ready dict: model file and hash, labels, output activation, the host frontend
        contract (sample rate, chunk length, STFT, mel, normalization, input scaling), the input
        and output tensors with their quantization, and the quantization scheme.
    """
    from birdnet_stm32.audio.features import frontend_contract

    multi_label = bool(run.model_config.get("model", {}).get("multi_label", run.config.model.multi_label))
    return {
        "metadata_version": METADATA_VERSION,
        "model_file": model_file,
        "model_bytes": len(tflite),
        "sha256": hashlib.sha256(tflite).hexdigest(),
        "labels": list(run.labels),
        "output_activation": "sigmoid" if multi_label else "softmax",
        "frontend": run.model_config.get("frontend") or frontend_contract(run.config.audio),
        "input": io["inputs"][0],
        "output": io["outputs"][0],
        "quantization": {
            "scheme": "int8 weights and activations, int32 biases",
            "weights": "per-channel" if export_cfg.per_channel else "per-tensor",
            "io": "int8" if export_cfg.int8_io else "float32 (QUANTIZE/DEQUANTIZE in the model)",
            "int8_input_formula": "q = clip(round(v / scale) + zero_point, -128, 127)",
            "output_formula": "p = (q - zero_point) * scale",
        },
    }


def _load_split(run: Run, data_dir: str | Path | None, data_cfg: DataConfig | None) -> tuple[Any, Any, dict[str, str]]:
    from birdnet_stm32.data.dataset import discover, prepare_datasets

    data = run.config.data
    if data_cfg is not None:
        data = dataclasses.replace(data, cache_dir=data_cfg.cache_dir, workers=data_cfg.workers)
    val_dir = None
    if data_dir is None:
        info = run.model_config.get("data") or {}
        if not info.get("train_dir"):
            raise UserError(f"{run.path / MODEL_CONFIG_FILE}: records no training data folder; pass --data DIR")
        data_dir = Path(info["train_dir"])
        if not data_dir.is_dir():
            raise UserError(f"{run.path}: the run's training data {data_dir} no longer exists; pass --data DIR")
        if info.get("val_dir"):
            val_dir = Path(info["val_dir"])
            if not val_dir.is_dir():
                raise UserError(f"{run.path}: the run's validation data {val_dir} no longer exists; pass --data DIR")
    else:
        discover(data_dir, classes=run.labels)
    train, val = prepare_datasets(data_dir, run.config.audio, data, seed=run.config.train.seed, val_dir=val_dir)
    if list(train.classes) != list(run.labels):
        raise UserError(f"--data {data_dir}: classes {train.classes} differ from the run's labels {run.labels}")
    return (
        train,
        val,
        {"train": f"{data_dir} (training split)", "val": str(val_dir or f"{data_dir} (validation split)")},
    )


def _check_features(model: Any, run: Run, train: Any, source: str) -> None:
    expected = tuple(int(d) for d in model.input_shape[1:])
    got = tuple(int(d) for d in train.x.shape[1:])
    if got != expected:
        raise UserError(
            f"{source}: features of shape {got} do not fit the model input {expected} "
            f"(audio settings in {run.path / 'config.yaml'} differ from the model's)"
        )
    if int(model.output_shape[-1]) != len(run.labels):
        raise UserError(f"{run.path}: model has {model.output_shape[-1]} outputs but {len(run.labels)} labels")


def _describe_subset(features: Any, rows: np.ndarray, source: str, seed: int) -> dict[str, Any]:
    y = features.y[rows]
    strata = np.where(y.max(axis=1) > 0, y.argmax(axis=1), -1)
    per_class = {name: int(np.sum(strata == i)) for i, name in enumerate(features.classes)}
    noise = int(np.sum(strata == -1))
    if noise:
        per_class["noise"] = noise
    return {"source": source, "chunks": int(len(rows)), "recordings": int(len(np.unique(features.groups[rows]))),
            "per_class": per_class, "seed": seed}  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    """Format an export report as the table printed by ``birdnet-stm32 export``.

    Args:
        report: The dict returned by :func:`export_run`.

    Returns:
        A multi-line string.
    """
    s = report["settings"]
    t = report["tflite"]
    f = report["fidelity"]
    lines = [
        f"Export of {report['run']}",
        f"  quantization      int8, {'per-channel' if s['per_channel'] else 'per-tensor'} weights, "
        f"{'int8' if s['int8_io'] else 'float32'} I/O, {report['calibration']['chunks']} calibration chunks "
        f"from {report['calibration']['recordings']} recordings",
        f"  conversion        {report['conversion_seconds']:.1f} s",
        f"  file size         {t['size_bytes'] / 1024:.1f} KiB",
        f"  peak activations  ~{t['peak_activation_bytes'] / 1024:.1f} KiB",
    ]
    for kind in ("inputs", "outputs"):
        for item in t[kind]:
            q = item.get("quantization") or item.get("int8_quantization")
            qtext = (
                f"  scale {q['scale']:.6g}, zero point {q['zero_point']}"
                if q and not isinstance(q["scale"], list)
                else ""
            )
            lines.append(f"  {kind[:-1]:<17} {item['dtype']} {item['shape']}{qtext}")
    lines.append("  operators         " + ", ".join(f"{name} x{n}" for name, n in t["op_counts"].items()))
    problems = report["audit"]["problems"]
    lines.append(f"STM32N6 audit: {'PASSED, no problems' if not problems else f'{len(problems)} problem(s)'}")
    for p in problems:
        where = "model" if p["op_index"] < 0 else f"op {p['op_index']} {p['op']}"
        lines.append(f"  [{p['check']}] {where}: {p['message']}")
    lines.append(f"Fidelity on {f['examples']} validation chunks")
    lines.append(f"  {'metric':<16}{'keras':>9}{'tflite':>9}{'diff':>9}")
    for name, m in f["metrics"].items():
        lines.append(f"  {name:<16}{_num(m['keras']):>9}{_num(m['tflite']):>9}{_num(m['diff'], signed=True):>9}")
    lines.append(
        f"  cosine {f['cosine_mean']:.4f} (p05 {f['cosine_p05']:.4f}, min {f['cosine_min']:.4f}), "
        f"top-1 agreement {100 * f['top1_agreement']:.1f} %{_labeled(f)}, max |diff| {f['max_abs_diff']:.4f}"
    )
    if report["passed"]:
        lines.append(f"PASSED: wrote {report['model_path']} and {report['metadata_path']}")
    else:
        lines.append("FAILED: " + "; ".join(report["failures"]) + " (model not written)")
    return "\n".join(lines)


def _labeled(fidelity: dict[str, Any]) -> str:
    value = fidelity.get("top1_agreement_labeled")
    return "" if value is None else f" ({100 * value:.1f} % on chunks with a species)"


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
