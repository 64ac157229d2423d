"""Evaluation plots: the confusion matrix as a PNG a person can read with up to ~50 classes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from birdnet_stm32.utils import atomic_path

#: Row label of the "no species" row of a confusion matrix with ``noise_row=True``.
NOISE_ROW_LABEL = "(no species)"

#: At most this many cells get their count printed (the largest ones); drawing text dominates the plot's cost.
MAX_ANNOTATIONS = 600


def plot_confusion_matrix(
    counts: np.ndarray, labels: Sequence[str], path: str | Path, *, title: str = "Confusion matrix"
) -> Path:
    """Draw a confusion matrix: colours are row-normalized rates, numbers are counts.

    Each row is coloured by the fraction of that true class predicted as each column, so rare and common
    classes are equally readable; the cell text is the raw count (empty cells are left blank; when more than
    :data:`MAX_ANNOTATIONS` cells are non-empty, only the largest counts are printed). The row
    labels carry the class's total and recall. A matrix with one row more than columns (from
    :func:`~birdnet_stm32.evaluation.metrics.confusion_matrix` with ``noise_row=True``) gets a last row
    labelled :data:`NOISE_ROW_LABEL`: what the model predicts on chunks without a species. Figure and font
    sizes scale with the number of classes; beyond ~50 the numbers get small but the colours stay readable.

    Args:
        counts: Integer counts, shape ``(C, C)`` or ``(C + 1, C)``; rows are true classes, columns predictions.
        labels: ``C`` class names in column order.
        path: Output PNG file; written atomically, parent folders created.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ValueError: ``counts`` does not have ``C`` columns and ``C`` or ``C + 1`` rows.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "cm.png"
        >>> plot_confusion_matrix(np.array([[5, 1], [0, 4]]), ["robin", "wren"], out).stat().st_size > 0
        True
    """
    counts = np.asarray(counts)
    n_cols = len(labels)
    if counts.ndim != 2 or counts.shape[1] != n_cols or counts.shape[0] not in (n_cols, n_cols + 1):
        raise ValueError(f"counts of shape {counts.shape} do not fit {n_cols} labels")
    n_rows = counts.shape[0]
    totals = counts.sum(axis=1)
    rates = counts / np.maximum(totals, 1)[:, None]

    row_labels = []
    for r in range(n_rows):
        if r < n_cols:
            recall = f"{rates[r, r]:.0%}" if totals[r] else "-"
            row_labels.append(f"{labels[r]}  (n={totals[r]}, recall {recall})")
        else:
            row_labels.append(f"{NOISE_ROW_LABEL}  (n={totals[r]})")

    cell = 0.36 if n_cols > 20 else 0.5
    width = max(5.0, 3.5 + cell * n_cols, 0.1 * max(map(len, title.splitlines() or [""])))
    height = max(4.0, 2.5 + cell * n_rows)
    font = float(np.clip(11 - n_cols / 6, 6.5, 10))
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    colorbar.set_label("fraction of the row (true class)")
    ax.set_xticks(range(n_cols), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n_rows), row_labels, fontsize=font)
    ax.set_xlabel("predicted class (top-1)")
    ax.set_ylabel("true class")
    fig.suptitle(title)
    ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.85", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    if n_rows > n_cols:
        ax.axhline(n_cols - 0.5, color="0.3", linewidth=1.0)
    largest = np.argsort(-counts, axis=None, kind="stable")[:MAX_ANNOTATIONS]
    for r, c in zip(*np.unravel_index(largest[counts.ravel()[largest] > 0], counts.shape), strict=True):
        color = "white" if rates[r, c] > 0.55 else "black"
        ax.text(c, r, str(counts[r, c]), ha="center", va="center", fontsize=font * 0.85, color=color, in_layout=False)

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
