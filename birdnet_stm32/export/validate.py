"""Fidelity of an int8 export: how closely the ``.tflite`` model reproduces the Keras model.

:func:`fidelity_report` runs both models on the same held-out inputs and compares them output by
output (cosine similarity, top-1 agreement, absolute differences) and on the task metrics
(accuracy, macro ROC-AUC, cmAP from :mod:`birdnet_stm32.evaluation.metrics`), side by side with
their difference. :func:`check_fidelity` turns the thresholds of
:class:`~birdnet_stm32.config.ExportConfig` into a list of failures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from birdnet_stm32.config import ExportConfig
from birdnet_stm32.evaluation import metrics

#: Task metrics compared between the Keras and the TFLite model.
TASK_METRICS = {"accuracy": metrics.accuracy, "macro_roc_auc": metrics.macro_roc_auc, "cmap": metrics.cmap}


def output_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Compare two score matrices row by row.

    Args:
        reference: Scores of the reference (float Keras) model, shape ``(N, C)``.
        candidate: Scores of the quantized model, shape ``(N, C)``.

    Returns:
        ``cosine_mean``, ``cosine_p05`` (5th percentile), ``cosine_min`` (cosine similarity of each
        row pair; two all-zero rows count as identical), ``top1_agreement`` (fraction of rows with
        the same arg-max), ``max_abs_diff`` and ``mean_abs_diff``.

    Raises:
        ValueError: The shapes differ or are empty.

    Examples:
        >>> a = np.array([[0.9, 0.1], [0.2, 0.8]])
        >>> out = output_agreement(a, np.array([[0.8, 0.2], [0.6, 0.4]]))
        >>> out["top1_agreement"], round(out["max_abs_diff"], 3)
        (0.5, 0.4)
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape or reference.ndim != 2 or not reference.size:
        raise ValueError(
            f"score matrices must have the same non-empty (N, C) shape, got {reference.shape} and {candidate.shape}"
        )
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    dots = np.sum(reference * candidate, axis=1)
    both_zero = (np.linalg.norm(reference, axis=1) == 0) & (np.linalg.norm(candidate, axis=1) == 0)
    cosine = np.where(both_zero, 1.0, dots / np.maximum(norms, 1e-12))
    diff = np.abs(reference - candidate)
    return {
        "cosine_mean": float(np.mean(cosine)),
        "cosine_p05": float(np.percentile(cosine, 5)),
        "cosine_min": float(np.min(cosine)),
        "top1_agreement": float(np.mean(np.argmax(reference, 1) == np.argmax(candidate, 1))),
        "max_abs_diff": float(np.max(diff)),
        "mean_abs_diff": float(np.mean(diff)),
    }


def task_metrics_side_by_side(y_true: np.ndarray, reference: np.ndarray, candidate: np.ndarray) -> dict[str, dict]:
    """Task metrics of both models and their difference (``tflite - keras``).

    Args:
        y_true: Targets, shape ``(N, C)``.
        reference: Keras scores, shape ``(N, C)``.
        candidate: TFLite scores, shape ``(N, C)``.

    Returns:
        ``{metric: {"keras": value, "tflite": value, "diff": value}}`` for accuracy, macro ROC-AUC
        and cmAP; a metric undefined on the data (e.g. AUC with one class present) is ``None``.

    Examples:
        >>> y = np.eye(2)[[0, 1, 1]]
        >>> s = task_metrics_side_by_side(y, y * 0.9 + 0.05, np.eye(2)[[0, 0, 1]] * 0.9 + 0.05)
        >>> s["accuracy"]
        {'keras': 1.0, 'tflite': 0.6666666666666666, 'diff': -0.33333333333333337}
    """
    out = {}
    for name, fn in TASK_METRICS.items():
        ref, cand = _finite(fn(y_true, reference)), _finite(fn(y_true, candidate))
        out[name] = {"keras": ref, "tflite": cand, "diff": None if ref is None or cand is None else cand - ref}
    return out


def fidelity_report(
    keras_model: Any, tflite_model: Any, x: np.ndarray, y: np.ndarray, batch_size: int = 64
) -> dict[str, Any]:
    """Run the Keras and the TFLite model on the same inputs and compare them.

    Args:
        keras_model: The float reference (anything with Keras' ``predict(x, batch_size=, verbose=)``).
        tflite_model: The quantized model, a :class:`~birdnet_stm32.export.tflite_model.TFLiteModel`.
        x: Inputs ``(N, H, W, 1)`` in float feature units (the validation split).
        y: Targets ``(N, C)``.
        batch_size: Batch size of the Keras predictions.

    Returns:
        ``{"examples": N, **output_agreement(...), "top1_agreement_labeled": ..., "metrics":
        task_metrics_side_by_side(...)}``; ``top1_agreement_labeled`` is the top-1 agreement over the
        examples that contain a species (on "no species" chunks a softmax has no meaningful top class,
        so near-ties flip there first), ``None`` without such examples.

    Examples:
        >>> report = fidelity_report(model, TFLiteModel(tflite_bytes), val.x, val.y)  # doctest: +SKIP
        >>> report["top1_agreement"], report["metrics"]["accuracy"]["diff"]  # doctest: +SKIP
        (0.996, -0.002)
    """
    reference = np.asarray(keras_model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    candidate = np.asarray(tflite_model.predict(x, verbose=True), dtype=np.float64)
    labeled = np.asarray(y).max(axis=1) >= metrics.POSITIVE_THRESHOLD
    same = np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)
    return {
        "examples": int(len(x)),
        **output_agreement(reference, candidate),
        "top1_agreement_labeled": float(np.mean(same[labeled])) if labeled.any() else None,
        "metrics": task_metrics_side_by_side(y, reference, candidate),
    }


def check_fidelity(report: dict[str, Any], export_cfg: ExportConfig) -> list[str]:
    """Compare a fidelity report with the configured thresholds.

    The top-1 threshold applies to the chunks that contain a species (``top1_agreement_labeled``), the same
    chunks top-1 accuracy is computed on: a "no species" chunk is trained towards a flat score vector, so its
    arg-max is a near-tie that means nothing and flips under any rounding; the cosine and the score differences
    still cover those chunks. Without any labeled chunk the agreement over all chunks is used.

    Args:
        report: The dict from :func:`fidelity_report`.
        export_cfg: Thresholds ``min_cosine``, ``min_top1_agreement`` and ``max_accuracy_drop``.

    Returns:
        One message per failed threshold (empty when all pass).

    Examples:
        >>> check_fidelity({"cosine_mean": 0.9, "top1_agreement": 0.9, "top1_agreement_labeled": 1.0,
        ...                 "metrics": {"accuracy": {"diff": -0.01}}}, ExportConfig())
        ['cosine similarity 0.9000 < export.min_cosine 0.95']
    """
    failures = []
    if report["cosine_mean"] < export_cfg.min_cosine:
        failures.append(f"cosine similarity {report['cosine_mean']:.4f} < export.min_cosine {export_cfg.min_cosine}")
    labeled = report.get("top1_agreement_labeled")
    agreement, where = (report["top1_agreement"], "") if labeled is None else (labeled, " on chunks with a species")
    if agreement < export_cfg.min_top1_agreement:
        limit = export_cfg.min_top1_agreement
        failures.append(f"top-1 agreement{where} {agreement:.4f} < export.min_top1_agreement {limit}")
    drop = report["metrics"]["accuracy"]["diff"]
    if drop is not None and -drop > export_cfg.max_accuracy_drop:
        failures.append(f"accuracy drop {-drop:.4f} > export.max_accuracy_drop {export_cfg.max_accuracy_drop}")
    return failures


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
