"""``birdnet-stm32 evaluate``: chunk- and file-level metrics of a ``.keras`` or ``.tflite`` model on a dataset.

The steps, the same for both model types so their numbers can be compared directly:

1. find the run folder (:func:`resolve_model`) and open it: labels and audio settings come from the run, so
   the features are computed exactly as in training;
2. discover the dataset with the run's labels (a folder that is not a class of the model is an error; a class
   without a folder only gets a warning) and load its features through the feature cache;
3. score every chunk with the model (Keras, or the TFLite interpreter with the builtin int8 kernels);
4. compute the metrics (:func:`summarize_scores`): per chunk, and per recording after pooling the chunk
   scores with each method of :mod:`~birdnet_stm32.evaluation.pooling`;
5. write ``eval_report.json`` and ``confusion_matrix.png`` and print a short table.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from birdnet_stm32 import __version__
from birdnet_stm32.errors import UserError
from birdnet_stm32.evaluation.metrics import compute_metrics, confusion_matrix
from birdnet_stm32.evaluation.plots import NOISE_ROW_LABEL, plot_confusion_matrix
from birdnet_stm32.evaluation.pooling import LME_SHARPNESS, METHODS, pool_by_group
from birdnet_stm32.run import MODEL_FILE, Run, open_run
from birdnet_stm32.utils import atomic_write_text

log = logging.getLogger(__name__)

#: File name of the JSON report.
REPORT_FILE = "eval_report.json"

#: File name of the chunk-level confusion-matrix plot.
CONFUSION_FILE = "confusion_matrix.png"


def resolve_model(model_path: str | Path) -> tuple[Path, str, Path]:
    """Work out which model file to evaluate, its type and its run folder.

    Args:
        model_path: A run folder (its ``model.keras`` is used), a ``.keras`` file or a ``.tflite`` file. The
            run folder of a file is its parent folder, which must hold ``model_config.json``.

    Returns:
        ``(model_file, kind, run_dir)`` with ``kind`` either ``"keras"`` or ``"tflite"``.

    Raises:
        UserError: The path does not exist, a run folder has no ``model.keras``, or a file is neither
            ``.keras`` nor ``.tflite``.

    Examples:
        >>> resolve_model("runs/demo/model_int8.tflite")  # doctest: +SKIP
        (PosixPath('runs/demo/model_int8.tflite'), 'tflite', PosixPath('runs/demo'))
    """
    path = Path(model_path)
    if not path.exists():
        raise UserError(f"--model {path}: does not exist")
    if path.is_dir():
        model_file = path / MODEL_FILE
        if not model_file.is_file():
            raise UserError(
                f"--model {path}: folder has no {MODEL_FILE}; give a run folder, a .keras or a .tflite file"
            )
        return model_file, "keras", path
    kinds = {".keras": "keras", ".tflite": "tflite"}
    if path.suffix.lower() not in kinds:
        raise UserError(f"--model {path}: expected a run folder, a .keras or a .tflite file")
    return path, kinds[path.suffix.lower()], path.parent


def summarize_scores(
    y_true: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    labels: Sequence[str],
    *,
    pooling: Sequence[str] = METHODS,
) -> dict[str, Any]:
    """Chunk-level and file-level metrics of one model's scores, JSON-ready.

    This is the numeric core of :func:`evaluate_model`, usable on any scores (the exporter compares a Keras
    model and its ``.tflite`` with it). A recording's target is the union of its chunks' targets (max-pooled),
    so a recording from a noise folder stays "no species".

    Args:
        y_true: Chunk targets, shape ``(N, C)`` (all-zero rows: no species).
        scores: Chunk scores, shape ``(N, C)``.
        groups: Recording index of every chunk, shape ``(N,)``.
        labels: ``C`` class names in output order.
        pooling: Pooling methods for the file level (see :data:`~birdnet_stm32.evaluation.pooling.METHODS`).

    Returns:
        ``{"chunk": metrics, "file": {method: metrics}, "confusion_matrix": {...}}`` where each ``metrics`` is
        :func:`~birdnet_stm32.evaluation.metrics.compute_metrics`'s dict. The confusion matrix is chunk-level
        with one extra row of top-1 predictions on "no species" chunks (when there are any).

    Raises:
        ValueError: Shapes do not match, scores are not finite, or a pooling method is unknown.

    Examples:
        >>> y = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
        >>> s = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.5, 0.5]])
        >>> out = summarize_scores(y, s, np.array([0, 0, 1, 2]), ["robin", "wren"], pooling=["mean"])
        >>> out["chunk"]["accuracy"], out["file"]["mean"]["accuracy"], out["file"]["mean"]["n_examples"]
        (0.6666666666666666, 1.0, 3)
    """
    _check_pooling(pooling)
    labels = list(labels)
    file_true, _ = pool_by_group(y_true, groups, "max")
    has_noise = bool((np.asarray(y_true) < 0.5).all(axis=1).any())
    counts = confusion_matrix(y_true, scores, len(labels), noise_row=has_noise)
    return {
        "chunk": compute_metrics(y_true, scores, labels),
        "file": {m: compute_metrics(file_true, pool_by_group(scores, groups, m)[0], labels) for m in pooling},
        "confusion_matrix": {
            "rows": labels + ([NOISE_ROW_LABEL] if has_noise else []),
            "columns": labels,
            "counts": counts.tolist(),
        },
    }


def evaluate_model(
    model_path: str | Path,
    data_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    pooling: Sequence[str] = METHODS,
) -> dict[str, Any]:
    """Evaluate a trained model on a labelled dataset and write ``eval_report.json`` and a confusion matrix.

    Args:
        model_path: A run folder (evaluates its ``model.keras``), a ``.keras`` file inside a run folder, or a
            ``.tflite`` file whose folder is the run folder (it holds ``model_config.json``).
        data_dir: Dataset root, ``DIR/<class>/<audio files>``; class folders must be labels of the model, and
            ``noise``/``background`` folders hold "no species" recordings.
        out_dir: Folder for ``eval_report.json`` and ``confusion_matrix.png``; default: the run folder.
            Evaluating a run's ``.keras`` and its ``.tflite`` into the same folder overwrites the first report.
        batch_size: Chunks per inference call (a batch-1 ``.tflite`` still runs one chunk at a time).
        pooling: File-level pooling methods to report.

    Returns:
        The report as written to ``eval_report.json``: top-level ``accuracy``, ``roc_auc`` and ``cmap``
        (chunk level), then ``model``, ``data_dir``, ``labels``, ``counts``, ``skipped_files``, ``chunk``,
        ``file`` (one section per pooling method), ``confusion_matrix``, ``pooling`` and ``outputs``.

    Raises:
        UserError: The model path is missing or not a run folder/``.keras``/``.tflite``; the run has no
            ``model_config.json``; the data folder is missing, holds no audio or holds a class the model does
            not know; the model's input or output does not fit the run's settings; ``batch_size < 1``.
        ValueError: An unknown pooling method.

    Examples:
        >>> report = evaluate_model("runs/demo/model_int8.tflite", "data/test")  # doctest: +SKIP
        >>> report["accuracy"], report["file"]["lme"]["cmap"]  # doctest: +SKIP
        (0.91, 0.95)
    """
    from birdnet_stm32.data.dataset import discover, load_features

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    _check_pooling(pooling)
    model_file, kind, run_dir = resolve_model(model_path)
    run = open_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir

    index = discover(data_dir, classes=run.labels)
    features = load_features(index, run.config.audio, run.config.data)
    if not len(features):
        raise UserError(f"--data {data_dir}: no audio files found (expected DIR/<class>/<audio files>)")
    log.info("Evaluating %s (%s) on %d chunks of %d recordings", model_file, kind, len(features), len(features.files))
    predict = _load_predictor(model_file, kind, run, features.x.shape[1:])
    scores = _predict_all(predict, features.x, batch_size, desc=f"Scoring with {model_file.name}")

    summary = summarize_scores(features.y, scores, features.groups, run.labels, pooling=pooling)
    chunk = summary["chunk"]
    noise_files = int((pool_by_group(features.y, features.groups, "max")[0] < 0.5).all(axis=1).sum())
    report = {
        "accuracy": chunk["accuracy"],
        "roc_auc": chunk["roc_auc"],
        "cmap": chunk["cmap"],
        "model": {"path": str(model_file), "type": kind, "run": str(run_dir)},
        "data_dir": str(data_dir),
        "labels": list(run.labels),
        "counts": {
            "files": len(features.files),
            "chunks": len(features),
            "noise_files": noise_files,
            "noise_chunks": chunk["n_noise"],
            "skipped_files": len(features.skipped),
        },
        "skipped_files": list(features.skipped),
        **summary,
        "pooling": {"methods": list(pooling), "lme_sharpness": LME_SHARPNESS},
        "outputs": {"report": REPORT_FILE, "confusion_matrix": CONFUSION_FILE},
        "birdnet_stm32_version": __version__,
    }
    atomic_write_text(out_dir / REPORT_FILE, json.dumps(report, indent=2, allow_nan=False))
    matrix = summary["confusion_matrix"]
    title = f"{model_file.name} on {Path(data_dir).name}\nchunk top-1 accuracy {_fmt(chunk['accuracy'])}"
    plot_confusion_matrix(np.array(matrix["counts"]), run.labels, out_dir / CONFUSION_FILE, title=title)
    print(format_report(report))
    print(f"Wrote {out_dir / REPORT_FILE} and {out_dir / CONFUSION_FILE}")
    return report


def format_report(report: dict[str, Any], *, worst: int = 5) -> str:
    """A short text table of an evaluation report: one line per level, then the classes with the lowest AP.

    Args:
        report: A report as returned by :func:`evaluate_model`.
        worst: How many classes with the lowest chunk-level AP to list.

    Returns:
        The table as a multi-line string.

    Examples:
        >>> print(format_report(report))  # doctest: +SKIP
        model_int8.tflite (tflite) on 12 files, 48 chunks
        level         n  accuracy  ROC-AUC   cmAP
        chunk        48     0.917    0.985  0.962
        ...
    """
    counts = report["counts"]
    skipped = f", {counts['skipped_files']} unreadable file(s) skipped" if counts["skipped_files"] else ""
    lines = [
        f"{Path(report['model']['path']).name} ({report['model']['type']}) on {counts['files']} files, "
        f"{counts['chunks']} chunks{skipped}",
        f"{'level':<11}{'n':>6}{'accuracy':>10}{'ROC-AUC':>9}{'cmAP':>7}",
    ]
    rows = [("chunk", report["chunk"])] + [(f"file/{m}", v) for m, v in report["file"].items()]
    for name, m in rows:
        lines.append(
            f"{name:<11}{m['n_examples']:>6}{_fmt(m['accuracy']):>10}{_fmt(m['roc_auc']):>9}{_fmt(m['cmap']):>7}"
        )
    per_class = [(v["ap"], label) for label, v in report["chunk"]["per_class"].items() if v["ap"] is not None]
    if per_class and worst > 0:
        lowest = ", ".join(f"{label} {ap:.3f}" for ap, label in sorted(per_class)[:worst])
        lines.append(f"lowest chunk AP: {lowest}")
    return "\n".join(lines)


def _check_pooling(pooling: Sequence[str]) -> None:
    unknown = [m for m in pooling if m not in METHODS]
    if unknown or not pooling:
        raise ValueError(f"pooling {list(pooling)}: choose one or more of {', '.join(METHODS)}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _load_predictor(model_file: Path, kind: str, run: Run, input_shape: tuple[int, ...]) -> Any:
    """Load the model and return ``predict(x_batch) -> (B, C) float32``, checking it fits the run."""
    n_labels = len(run.labels)
    if kind == "tflite":
        from birdnet_stm32.export.tflite_model import TFLiteModel

        model = TFLiteModel(model_file)
        model_input, n_out = model.input_shape, model.num_classes

        def predict(x: np.ndarray) -> np.ndarray:
            return model.predict(x, batch_size=len(x))

    else:
        model = _load_keras(model_file, run)
        model_input, n_out = tuple(model.input_shape[1:]), int(model.output_shape[-1])

        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict_on_batch(x), dtype=np.float32)

    if tuple(model_input) != tuple(input_shape):
        raise UserError(f"{model_file}: takes inputs of shape {tuple(model_input)} but the run's audio settings "
                        f"give {tuple(input_shape)}; is this the model of {run.path}?")  # fmt: skip
    if n_out != n_labels:
        raise UserError(f"{model_file}: outputs {n_out} scores but {run.path} lists {n_labels} labels; "
                        f"is this the model of {run.path}?")  # fmt: skip
    return predict


def _load_keras(model_file: Path, run: Run) -> Any:
    """Load a ``.keras`` file with safe mode, turning a corrupt file into a :class:`UserError`."""
    try:
        if model_file.resolve() == run.model_path.resolve():
            return run.load_model()
        import keras

        import birdnet_stm32.models  # noqa: F401  (registers the custom layers)

        return keras.saving.load_model(model_file, compile=False, safe_mode=True)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{model_file}: not a loadable Keras model ({str(exc).splitlines()[0]})") from None


def _predict_all(predict: Any, x: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    """Run ``predict`` over ``x`` in batches with a progress bar; return float64 scores."""
    out = []
    with tqdm(total=len(x), desc=desc, unit="chunk") as bar:
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            out.append(predict(batch))
            bar.update(len(batch))
    scores = np.concatenate(out).astype(np.float64)
    if not np.isfinite(scores).all():
        raise UserError(
            f"the model produced NaN or infinite scores on {int((~np.isfinite(scores)).any(1).sum())} chunk(s)"
        )
    return scores
