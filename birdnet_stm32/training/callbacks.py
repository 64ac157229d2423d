"""Keras callbacks of the trainer: validation metrics and everything written to the run folder per epoch.

* :class:`ValidationMetrics` scores the validation split at each epoch end with the
  same NumPy metrics as ``birdnet-stm32 evaluate`` (accuracy, macro ROC-AUC, cmAP)
  and adds them to the epoch's logs as ``val_*``.
* :class:`RunCheckpointer` keeps the best model (``model.keras``, written
  atomically), a resumable last state (``checkpoint/last.keras`` with the
  optimizer, and ``checkpoint/state.json``), ``history.csv`` with the learning
  rate of every epoch, ``curves.png``, and stops early when the monitored metric
  stalls.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from birdnet_stm32.evaluation import metrics
from birdnet_stm32.utils import atomic_path, atomic_write_text

CHECKPOINT_DIR = "checkpoint"
LAST_MODEL = "last.keras"
STATE_FILE = "state.json"


def training_targets(y: np.ndarray, multi_label: bool) -> np.ndarray:
    """Targets the loss sees: "no species" rows become uniform for softmax models.

    A recording from a ``noise``/``background`` folder has an all-zero label row. A
    sigmoid (multi-label) model learns "all outputs low" from it directly; a softmax
    model cannot output all zeros, so its target is the uniform distribution
    ("no class is more likely than another").

    Args:
        y: Label rows ``(N, C)``, one-hot, multi-hot or all-zero.
        multi_label: Whether the model has sigmoid outputs.

    Returns:
        Targets ``(N, C)`` as float32.

    Examples:
        >>> training_targets(np.array([[0.0, 1.0], [0.0, 0.0]]), multi_label=False).tolist()
        [[0.0, 1.0], [0.5, 0.5]]
    """
    y = np.asarray(y, dtype=np.float32)
    if multi_label:
        return y
    empty = y.sum(axis=1, keepdims=True) <= 0
    return np.where(empty, np.float32(1.0 / y.shape[1]), y).astype(np.float32)


class ValidationMetrics(keras.callbacks.Callback):
    """Score the validation split at each epoch end and add ``val_*`` entries to the logs.

    Must come before callbacks that read ``val_*`` (checkpointing, early stopping).

    Args:
        x: Validation inputs ``(N, H, W, 1)``.
        y: Validation labels ``(N, C)`` (all-zero rows = no species).
        multi_label: Whether the model has sigmoid outputs.
        batch_size: Inference batch size.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, multi_label: bool, batch_size: int = 64):
        super().__init__()
        self.x = x
        self.y = np.asarray(y, dtype=np.float32)
        self.targets = training_targets(self.y, multi_label)
        self.batch_size = batch_size

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Predict the validation split and add ``val_loss``, ``val_accuracy``, ``val_auc``, ``val_cmap``."""
        if logs is None:
            return
        probs = self.model.predict(self.x, batch_size=self.batch_size, verbose=0)
        logs["val_loss"] = float(keras.ops.convert_to_numpy(self.model.loss(self.targets, probs)))
        logs["val_accuracy"] = float(metrics.accuracy(self.y, probs))
        logs["val_auc"] = float(metrics.macro_roc_auc(self.y, probs))
        logs["val_cmap"] = float(metrics.cmap(self.y, probs))


class RunCheckpointer(keras.callbacks.Callback):
    """Write the run folder at each epoch end; stop early when the monitored metric stalls.

    Args:
        run_dir: The run folder.
        monitor: Log key to maximize (for example ``"val_accuracy"``).
        patience: Epochs without improvement before stopping (0 = never stop early).
        state: Saved state of an interrupted run (from :func:`load_state`) to continue from.
    """

    def __init__(
        self,
        run_dir: str | Path,
        monitor: str = "val_accuracy",
        patience: int = 10,
        state: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.monitor = monitor
        self.patience = patience
        state = state or {}
        self.best = state.get("best", -math.inf)
        self.best_epoch = state.get("best_epoch", -1)
        self.wait = state.get("wait", 0)
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        self.stopped_early = False
        self._epoch_start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Start the epoch timer."""
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Save the best model, the resumable state, ``history.csv`` and ``curves.png``."""
        logs = dict(logs or {})
        row = {"epoch": epoch + 1, "lr": current_lr(self.model.optimizer)}
        row.update({k: float(v) for k, v in logs.items() if k != "learning_rate"})
        row["seconds"] = round(time.perf_counter() - self._epoch_start, 3)
        self.history.append(row)
        value = logs.get(self.monitor)
        if value is not None and value > self.best:
            self.best, self.best_epoch, self.wait = float(value), epoch + 1, 0
            save_model_atomic(self.model, self.run_dir / "model.keras")
        else:
            self.wait += 1
        if self.patience and self.wait >= self.patience:
            self.stopped_early = True
            self.model.stop_training = True
        save_model_atomic(self.model, self.run_dir / CHECKPOINT_DIR / LAST_MODEL)
        state = {"epoch": epoch + 1, "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                 "monitor": self.monitor, "history": self.history}  # fmt: skip
        atomic_write_text(self.run_dir / CHECKPOINT_DIR / STATE_FILE, json.dumps(state, indent=1))
        write_history(self.history, self.run_dir / "history.csv")
        plot_curves(self.history, self.run_dir / "curves.png", monitor=self.monitor)


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    """Learning rate the optimizer applies at its current step (schedules evaluated).

    Args:
        optimizer: A Keras 3 optimizer.

    Returns:
        The learning rate as a Python float.
    """
    lr = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(lr))


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save a Keras model (with its optimizer state) to ``path`` via a temporary file and a rename.

    Args:
        model: The model.
        path: Destination ``.keras`` file.
    """
    with atomic_path(path) as tmp:
        model.save(tmp)


def load_state(run_dir: str | Path) -> dict[str, Any] | None:
    """Read the resumable state of a run, if any.

    Args:
        run_dir: The run folder.

    Returns:
        The state dict (``epoch``, ``best``, ``history`` ...) or ``None`` when there is none.
    """
    path = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
    if not path.is_file() or not (Path(run_dir) / CHECKPOINT_DIR / LAST_MODEL).is_file():
        return None
    return json.loads(path.read_text())


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    """Write per-epoch rows as CSV (atomically); columns are the union of all rows' keys.

    Args:
        history: One dict per epoch.
        path: Destination CSV file.
    """
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def plot_curves(history: list[dict[str, Any]], path: Path, monitor: str = "val_accuracy") -> None:
    """Plot loss, validation metrics and learning rate per epoch into one PNG.

    Args:
        history: One dict per epoch (as in ``history.csv``).
        path: Destination PNG file.
        monitor: The metric used to pick the best epoch (marked in the plot).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.array([row["epoch"] for row in history])

    def series(key: str) -> np.ndarray:
        return np.array([row.get(key, np.nan) for row in history], dtype=float)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.plot(epochs, series("loss"), "o-", label="train loss", ms=3)
    ax.plot(epochs, series("val_loss"), "o-", label="validation loss", ms=3)
    ax.set_title("Loss")
    ax = axes[1]
    for key, label in (("val_accuracy", "val accuracy"), ("val_auc", "val macro ROC-AUC"), ("val_cmap", "val cmAP")):
        ax.plot(epochs, series(key), "o-", label=label, ms=3)
    best = series(monitor)
    if np.isfinite(best).any():
        i = int(np.nanargmax(best))
        ax.axvline(epochs[i], color="grey", ls=":", label=f"best epoch ({epochs[i]})")
    ax.set_ylim(0, 1.02)
    ax.set_title("Validation metrics")
    ax = axes[2]
    ax.plot(epochs, series("lr"), "o-", color="tab:purple", ms=3)
    ax.set_yscale("log")
    ax.set_title("Learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
