"""Classification metrics over score matrices: accuracy, ROC-AUC, average precision, confusion matrix.

Pure NumPy, so the same numbers come out for a Keras model, a ``.tflite`` file or scores loaded from disk,
and the module imports without TensorFlow. The ranking metrics follow scikit-learn's definitions exactly
(tied scores are handled the same way), which the tests check on random data.

Conventions shared by every function:

* ``y_true`` has shape ``(N, C)``: one row per example, one column per class, in the model's output order.
  It is binarized at 0.5, so one-hot, multi-hot (several species in one chunk) and label-smoothed targets
  all work. A row with no positive class is a **"no species"** example (a chunk from a noise or background
  folder).
* ``y_prob`` has shape ``(N, C)``: the model's scores (softmax or sigmoid outputs, or pooled file scores).
  Only their order matters for AUC and AP; top-1 uses the arg-max.
* "No species" rows are negatives for every class in ROC-AUC and AP: a model that scores a species high on
  background noise is penalized there. They are **excluded from top-1 accuracy**, which asks "of the examples
  that contain a species, how often is the top-scoring class one of them?"; a softmax over species always
  names some species, so top-1 has no correct answer for a noise example. The confusion matrix can show
  them as an extra row (``noise_row=True``).
* A metric that is undefined for the given data (AUC of a class with only positives or only negatives, AP
  of a class without positives, accuracy without any labeled example) is ``nan`` here and ``None`` in
  :func:`compute_metrics`'s JSON-ready output; the macro averages skip such classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Targets at or above this value count as positives.
POSITIVE_THRESHOLD = 0.5


def accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Top-1 accuracy over the examples that contain at least one species.

    A prediction is correct when the class with the highest score is one of the example's positive
    classes (for one-hot targets: the true class). "No species" rows (all targets below 0.5) are left out;
    see the module docstring for why.

    Args:
        y_true: Targets, shape ``(N, C)``; binarized at 0.5.
        y_prob: Scores, shape ``(N, C)``.

    Returns:
        The fraction of labeled examples whose top-1 class is a positive, in ``[0, 1]``; ``nan`` when no
        row has a positive.

    Raises:
        ValueError: The arrays are not 2-D with equal shapes, or contain non-finite scores.

    Examples:
        >>> y_true = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
        >>> y_prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
        >>> accuracy(y_true, y_prob)  # the noise row [0, 0] is not counted
        0.6666666666666666
    """
    pos, scores = _check_pair(y_true, y_prob)
    labeled = pos.any(axis=1)
    if not labeled.any():
        return math.nan
    top1 = scores.argmax(axis=1)
    hits = pos[np.arange(len(pos)), top1]
    return float(hits[labeled].mean())


def roc_auc(y_true_col: np.ndarray, score_col: np.ndarray) -> float:
    """Area under the ROC curve of one class (binary problem).

    Computed as the Mann-Whitney U statistic: the probability that a random positive scores higher than a
    random negative, with ties counting one half. Equal to ``sklearn.metrics.roc_auc_score``.

    Args:
        y_true_col: Targets of one class, shape ``(N,)``; binarized at 0.5.
        score_col: Scores of that class, shape ``(N,)``.

    Returns:
        The AUC in ``[0, 1]``; ``nan`` when the column has no positive or no negative.

    Raises:
        ValueError: The arrays are not 1-D with equal lengths, or contain non-finite scores.

    Examples:
        >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
        0.75
        >>> roc_auc(np.array([1, 1]), np.array([0.2, 0.3]))
        nan
    """
    pos, scores = _check_column(y_true_col, score_col)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(scores)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """ROC-AUC of every class, one-vs-rest.

    Args:
        y_true: Targets, shape ``(N, C)``; binarized at 0.5.
        y_prob: Scores, shape ``(N, C)``.

    Returns:
        Float array of shape ``(C,)``; ``nan`` for a class whose column has only positives or only negatives.

    Raises:
        ValueError: The arrays are not 2-D with equal shapes, or contain non-finite scores.
    """
    pos, scores = _check_pair(y_true, y_prob)
    return np.array([roc_auc(pos[:, c], scores[:, c]) for c in range(pos.shape[1])], dtype=np.float64)


def macro_roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Unweighted mean of the per-class ROC-AUC over the classes where it is defined.

    Classes whose column holds only one label value (no positive, or no negative example) are skipped;
    scikit-learn's ``roc_auc_score(average="macro")`` raises instead. On data where every class has both,
    the two agree.

    Args:
        y_true: Targets, shape ``(N, C)``; binarized at 0.5.
        y_prob: Scores, shape ``(N, C)``.

    Returns:
        The macro ROC-AUC in ``[0, 1]``; ``nan`` when no class has both positives and negatives.

    Raises:
        ValueError: The arrays are not 2-D with equal shapes, or contain non-finite scores.

    Examples:
        >>> y_true = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
        >>> y_prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
        >>> macro_roc_auc(y_true, y_prob)
        1.0
    """
    return _nanmean(roc_auc_per_class(y_true, y_prob))


def average_precision(y_true_col: np.ndarray, score_col: np.ndarray) -> float:
    """Average precision of one class: the area under its precision-recall step curve.

    ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the distinct score thresholds from high to low, where tied
    scores form one threshold. Equal to ``sklearn.metrics.average_precision_score`` (no interpolation).

    Args:
        y_true_col: Targets of one class, shape ``(N,)``; binarized at 0.5.
        score_col: Scores of that class, shape ``(N,)``.

    Returns:
        The AP in ``[0, 1]``; ``nan`` when the column has no positive (scikit-learn returns 0 with a
        warning there, which would drag a class-wise mean down for a class that was simply absent).

    Raises:
        ValueError: The arrays are not 1-D with equal lengths, or contain non-finite scores.

    Examples:
        >>> average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
        0.8333333333333333
    """
    pos, scores = _check_column(y_true_col, score_col)
    n_pos = int(pos.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    tp = np.cumsum(pos[order])
    # The last index of every group of tied scores is one threshold.
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tp = tp[last]
    precision = tp / (last + 1.0)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def average_precision_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Average precision of every class, one-vs-rest.

    Args:
        y_true: Targets, shape ``(N, C)``; binarized at 0.5.
        y_prob: Scores, shape ``(N, C)``.

    Returns:
        Float array of shape ``(C,)``; ``nan`` for a class without positives.

    Raises:
        ValueError: The arrays are not 2-D with equal shapes, or contain non-finite scores.

    Examples:
        >>> y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
        >>> y_prob = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1]])
        >>> average_precision_per_class(y_true, y_prob).round(3).tolist()
        [1.0, 1.0, nan]
    """
    pos, scores = _check_pair(y_true, y_prob)
    return np.array([average_precision(pos[:, c], scores[:, c]) for c in range(pos.shape[1])], dtype=np.float64)


def cmap(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Class-wise mean average precision (cmAP): the unweighted mean of the per-class AP.

    Classes without any positive example are skipped (their AP is undefined). Every class counts the same
    however many examples it has, so rare species weigh as much as common ones.

    Args:
        y_true: Targets, shape ``(N, C)``; binarized at 0.5.
        y_prob: Scores, shape ``(N, C)``.

    Returns:
        The cmAP in ``[0, 1]``; ``nan`` when no class has a positive.

    Raises:
        ValueError: The arrays are not 2-D with equal shapes, or contain non-finite scores.

    Examples:
        >>> y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
        >>> y_prob = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1]])
        >>> cmap(y_true, y_prob)  # the third class has no positives and is skipped
        1.0
    """
    return _nanmean(average_precision_per_class(y_true, y_prob))


def confusion_matrix(
    y_true: np.ndarray, y_prob: np.ndarray, num_classes: int, *, noise_row: bool = False
) -> np.ndarray:
    """Count top-1 predictions per true class.

    Rows are true classes, columns the arg-max of the scores. For a multi-hot row the example is counted
    on the diagonal when the top-1 class is one of its positives, else in the row of its first positive
    class, so that ``trace / sum`` of the first ``num_classes`` rows equals :func:`accuracy`.

    Args:
        y_true: Targets, shape ``(N, num_classes)``; binarized at 0.5.
        y_prob: Scores, shape ``(N, num_classes)``.
        num_classes: Number of classes ``C``.
        noise_row: Append a last row that counts the top-1 predictions on "no species" examples (rows
            without a positive). Without it those examples are not counted.

    Returns:
        Integer counts, shape ``(C, C)``, or ``(C + 1, C)`` with ``noise_row``.

    Raises:
        ValueError: The arrays are not 2-D with ``num_classes`` columns, or contain non-finite scores.

    Examples:
        >>> y_true = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
        >>> y_prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
        >>> confusion_matrix(y_true, y_prob, 2).tolist()
        [[1, 0], [1, 1]]
        >>> confusion_matrix(y_true, y_prob, 2, noise_row=True).tolist()
        [[1, 0], [1, 1], [1, 0]]
    """
    pos, scores = _check_pair(y_true, y_prob)
    if pos.shape[1] != num_classes:
        raise ValueError(f"y_true has {pos.shape[1]} columns, expected num_classes={num_classes}")
    top1 = scores.argmax(axis=1)
    labeled = pos.any(axis=1)
    hit = pos[np.arange(len(pos)), top1]
    true_row = np.where(hit, top1, pos.argmax(axis=1))
    true_row = np.where(labeled, true_row, num_classes)
    rows = num_classes + 1 if noise_row else num_classes
    keep = true_row < rows
    counts = np.zeros((rows, num_classes), dtype=np.int64)
    np.add.at(counts, (true_row[keep], top1[keep]), 1)
    return counts


def compute_metrics(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """All metrics of one score matrix, JSON-ready, with ``accuracy`` first.

    Args:
        y_true: Targets, shape ``(N, C)``; binarized at 0.5.
        y_prob: Scores, shape ``(N, C)``.
        labels: Class names in column order (``C`` of them).

    Returns:
        A dict with plain Python values (undefined metrics are ``None``)::

            accuracy      top-1 accuracy over examples with a species
            roc_auc       macro ROC-AUC over classes with positives and negatives
            cmap          class-wise mean AP over classes with positives
            n_examples    number of rows
            n_labeled     rows with at least one species
            n_noise       "no species" rows
            per_class     {label: {"ap", "roc_auc", "n_positive"}}

    Raises:
        ValueError: The arrays are not 2-D with equal shapes, contain non-finite scores, or ``labels`` does
            not have one name per column.

    Examples:
        >>> y_true = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
        >>> y_prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
        >>> m = compute_metrics(y_true, y_prob, ["robin", "wren"])
        >>> round(m["accuracy"], 3), m["roc_auc"], m["n_noise"], m["per_class"]["wren"]["ap"]
        (0.667, 1.0, 1, 1.0)
    """
    pos, scores = _check_pair(y_true, y_prob)
    if len(labels) != pos.shape[1]:
        raise ValueError(f"got {len(labels)} labels for {pos.shape[1]} score columns")
    ap = average_precision_per_class(pos, scores)
    auc = roc_auc_per_class(pos, scores)
    n_labeled = int(pos.any(axis=1).sum())
    return {
        "accuracy": _json_float(accuracy(pos, scores)),
        "roc_auc": _json_float(_nanmean(auc)),
        "cmap": _json_float(_nanmean(ap)),
        "n_examples": int(len(pos)),
        "n_labeled": n_labeled,
        "n_noise": int(len(pos)) - n_labeled,
        "per_class": {
            str(label): {
                "ap": _json_float(ap[c]),
                "roc_auc": _json_float(auc[c]),
                "n_positive": int(pos[:, c].sum()),
            }
            for c, label in enumerate(labels)
        },
    }


def _check_pair(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a target/score matrix pair; return (boolean positives, float64 scores)."""
    y_true = np.asarray(y_true)
    scores = np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != scores.shape:
        raise ValueError(f"y_true {y_true.shape} and y_prob {scores.shape} must be 2-D arrays of the same shape")
    if not np.isfinite(scores).all():
        raise ValueError("y_prob contains NaN or infinite scores")
    return y_true >= POSITIVE_THRESHOLD, scores


def _check_column(y_true_col: np.ndarray, score_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a target/score column pair; return (boolean positives, float64 scores)."""
    y_true_col = np.asarray(y_true_col)
    scores = np.asarray(score_col, dtype=np.float64)
    if y_true_col.ndim != 1 or y_true_col.shape != scores.shape:
        raise ValueError(f"y_true_col {y_true_col.shape} and score_col {scores.shape} must be 1-D of equal length")
    if not np.isfinite(scores).all():
        raise ValueError("score_col contains NaN or infinite scores")
    return y_true_col >= POSITIVE_THRESHOLD, scores


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` in ascending order; tied values share the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    group_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; ``nan`` when there are none (without NumPy's empty-slice warning)."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def _json_float(value: float) -> float | None:
    """``value`` as a float, or ``None`` for ``nan`` (JSON has no NaN)."""
    return None if math.isnan(value) else float(value)
