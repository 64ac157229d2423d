"""The training run behind ``birdnet-stm32 train`` and ``find-lr``: data -> model -> LR -> fit -> run folder.

One code path serves the CLI and ``scripts/train.py``. A run:

1. seeds everything (``train.seed``) and picks a ``tf.distribute`` strategy;
2. loads the cached features and the grouped train/validation split
   (:func:`birdnet_stm32.data.dataset.prepare_datasets`);
3. builds the DS-CNN and prints its summary (parameters, MACs, int8 size, peak activations);
4. chooses the learning rate: ``--find-lr`` runs the LR range test on the same model, pipeline,
   optimizer and batch size and feeds its recommendation for the chosen schedule; ``--lr X``
   uses X; otherwise :data:`birdnet_stm32.config.DEFAULT_LR`;
5. fits with the schedule (warmup + cosine, one-cycle or constant), scoring the validation split
   each epoch, keeping the best ``model.keras``, a resumable checkpoint, ``history.csv`` and
   ``curves.png``;
6. writes ``model_config.json``, ``labels.txt`` and the effective ``config.yaml``.

The learning rate is for the **global** batch (``train.batch_size``), whatever the number of replicas.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from birdnet_stm32.config import DEFAULT_LR, Config
from birdnet_stm32.errors import UserError
from birdnet_stm32.run import CONFIG_FILE, LABELS_FILE, MODEL_FILE, save_model_config
from birdnet_stm32.utils import atomic_write_text, set_global_seed

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from birdnet_stm32.training.lr_finder import LRFinderResult

log = logging.getLogger(__name__)

RUN_ARGS_FILE = "checkpoint/run_args.json"


@dataclass
class TrainResult:
    """What a finished (or interrupted) training run produced.

    Args:
        run_dir: The run folder.
        lr: Peak learning rate of the schedule (the constant LR for ``constant``).
        found_lr: The LR finder's recommendation for the schedule, if ``--find-lr`` ran.
        epochs: Epochs completed.
        best_epoch: Epoch of the saved ``model.keras``.
        val_accuracy: Validation accuracy of the saved model.
        history: Per-epoch rows as in ``history.csv``.
        interrupted: Whether the run was stopped with Ctrl+C.
    """

    run_dir: Path
    lr: float
    found_lr: float | None
    epochs: int
    best_epoch: int
    val_accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Return the ``tf.distribute`` strategy for ``--strategy``.

    ``auto`` mirrors over all GPUs when there are two or more, else uses the default
    strategy. ``mirrored`` mirrors over all GPUs, or over all logical CPU devices when
    there is no GPU. ``multiworker`` needs ``TF_CONFIG`` describing the cluster.

    Args:
        name: ``"auto"``, ``"default"``, ``"mirrored"`` or ``"multiworker"``.

    Returns:
        A ``tf.distribute.Strategy``.

    Raises:
        UserError: ``multiworker`` without ``TF_CONFIG``, or an unknown name.
    """
    import os

    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    if name in ("auto", "mirrored"):
        if gpus:
            return tf.distribute.MirroredStrategy(devices=[d.name for d in gpus])
        # CPU replicas: reduce through one device. The default collective all-reduce keys its ops by an
        # instance counter that clashes when several strategies live in one process.
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise UserError("--strategy multiworker: set TF_CONFIG to describe the cluster (see docs/training.md)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise UserError(f"--strategy {name}: choose auto, default, mirrored or multiworker")


def make_optimizer(
    cfg: Config, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule
) -> keras.optimizers.Optimizer:
    """Build the optimizer named by ``train.optimizer`` with the given LR (float or schedule).

    Args:
        cfg: The run config.
        learning_rate: A float or a ``LearningRateSchedule``.

    Returns:
        A Keras optimizer.
    """
    import keras

    t = cfg.train
    if t.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if t.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=t.weight_decay)
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=t.momentum, nesterov=True)


def make_loss(cfg: Config) -> keras.losses.Loss:
    """Cross-entropy for the label mode, with ``train.label_smoothing``.

    Args:
        cfg: The run config.

    Returns:
        A Keras loss: categorical cross-entropy (softmax) or binary cross-entropy (multi-label).
    """
    import keras

    if cfg.model.multi_label:
        return keras.losses.BinaryCrossentropy(label_smoothing=cfg.train.label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing)


def class_weights(y: np.ndarray) -> np.ndarray:
    """Inverse-frequency class weights, normalized to mean 1 over the classes present.

    Works for one-hot and multi-hot labels (a recording with several species counts for
    each). Classes without examples get weight 1.

    Args:
        y: Label rows ``(N, C)``.

    Returns:
        Weights ``(C,)``.

    Examples:
        >>> class_weights(np.array([[1, 0], [1, 0], [1, 0], [0, 1]])).tolist()
        [0.5, 1.5]
    """
    counts = np.asarray(y, dtype=np.float64).sum(axis=0)
    present = counts > 0
    weights = np.ones_like(counts)
    weights[present] = 1.0 / counts[present]
    weights[present] /= weights[present].mean()
    return weights


def sample_weights(y: Any, weights: np.ndarray) -> Any:
    """Per-example weight: the target-weighted mean of the class weights (1 for all-zero rows).

    Applied inside the ``tf.data`` pipeline after mixup, so mixed examples get mixed weights
    and multi-label rows the mean weight of their species.

    Args:
        y: Label batch ``(B, C)`` (a tensor or array).
        weights: Class weights ``(C,)`` from :func:`class_weights`.

    Returns:
        Weights ``(B,)``.
    """
    import keras

    y = keras.ops.cast(y, "float32")
    total = keras.ops.sum(y, axis=-1)
    weighted = keras.ops.sum(y * keras.ops.convert_to_tensor(weights, "float32"), axis=-1)
    return keras.ops.where(total > 0, weighted / keras.ops.maximum(total, 1e-6), 1.0)


def _train_dataset(cfg: Config, train, weights: np.ndarray | None):
    """The training pipeline: targets as the loss sees them, augmented, with per-example class weights.

    "No species" rows become uniform targets for a softmax model *before* augmentation, so a noise chunk mixed
    into a species chunk by mixup contributes its uniform share of the target instead of nothing.
    """
    import dataclasses

    import tensorflow as tf

    from birdnet_stm32.data.dataset import make_tf_dataset
    from birdnet_stm32.training.callbacks import training_targets

    targets = dataclasses.replace(train, y=training_targets(train.y, cfg.model.multi_label))
    ds = make_tf_dataset(targets, cfg.train.batch_size, training=True, data_cfg=cfg.data, seed=cfg.train.seed)
    if weights is None:
        return ds
    return ds.map(lambda x, y: (x, y, sample_weights(y, weights)), num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )


def _compile(model, cfg: Config, learning_rate) -> None:
    import keras

    metric = keras.metrics.BinaryAccuracy(name="accuracy") if cfg.model.multi_label else "categorical_accuracy"
    model.compile(
        optimizer=make_optimizer(cfg, learning_rate),
        loss=make_loss(cfg),
        metrics=[metric],
        steps_per_execution=cfg.train.steps_per_execution,
    )


def _find_lr(model, cfg: Config, train_set, weights: np.ndarray | None, run_dir: Path, strategy, probe: bool):
    """Run the LR range test on the training pipeline without augmentation.

    Mixup, masks and random gain add batch-to-batch loss noise that hides the loss's fall;
    the sweep measures how the loss of the real data responds to the learning rate. With ``probe`` the
    constant-LR probes pick the recommended constant LR.
    """
    import dataclasses

    from birdnet_stm32.training.lr_finder import find_lr

    plain = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, mixup_alpha=0.0, time_masks=0, freq_masks=0, gain_db=0.0)
    )
    f = cfg.train.lr_finder
    result = find_lr(
        model,
        _train_dataset(plain, train_set, weights),
        min_lr=f.min_lr,
        max_lr=f.max_lr,
        num_steps=f.num_steps,
        smoothing=f.smoothing,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        strategy=strategy,
        probe_steps=f.probe_steps if probe else 0,
    )
    result.save(run_dir)
    return result


def run_find_lr(cfg: Config, data_dir: str | Path, out_dir: str | Path) -> LRFinderResult:
    """Run only the LR range test on a dataset with the configured model (``birdnet-stm32 find-lr``).

    Args:
        cfg: The configuration (model, data, optimizer, batch size and sweep settings).
        data_dir: Dataset root with one folder per class.
        out_dir: Folder for ``lr_finder.csv``, ``lr_finder.json`` and ``lr_finder.png``.

    Returns:
        The :class:`~birdnet_stm32.training.lr_finder.LRFinderResult`.

    Raises:
        UserError: Bad data or settings.
    """
    from birdnet_stm32.data.dataset import prepare_datasets
    from birdnet_stm32.models import build_model

    set_global_seed(cfg.train.seed)
    out_dir = Path(out_dir)
    train_set, _ = prepare_datasets(data_dir, cfg.audio, cfg.data, seed=cfg.train.seed)
    strategy = make_strategy(cfg.train.strategy)
    with strategy.scope():
        model = build_model(cfg.audio, cfg.model, len(train_set.classes))
        _compile(model, cfg, DEFAULT_LR)
    weights = class_weights(train_set.y) if cfg.train.class_weights else None
    result = _find_lr(model, cfg, train_set, weights, out_dir, strategy, probe=True)
    log.info("LR finder files written to %s", out_dir)
    return result


def train(
    cfg: Config,
    data_dir: str | Path | None,
    out_dir: str | Path | None,
    val_dir: str | Path | None = None,
    resume: str | Path | None = None,
) -> TrainResult:
    """Train a model and write the run folder.

    Args:
        cfg: The effective configuration (defaults < ``--config`` < flags). Ignored for
            ``resume``, which continues with the interrupted run's own ``config.yaml``.
        data_dir: Dataset root with one folder per class.
        out_dir: The run folder to create (or reuse).
        val_dir: Optional validation dataset root; overrides the grouped split.
        resume: A run folder to continue from its last completed epoch, with optimizer state
            and schedule position restored.

    Returns:
        A :class:`TrainResult`.

    Raises:
        UserError: Bad data, bad settings, a bad LR sweep without ``--lr`` fallback, or a
            run folder that cannot be resumed.
        KeyboardInterrupt: After saving, when the user pressed Ctrl+C.
    """
    import keras

    from birdnet_stm32.data.dataset import prepare_datasets
    from birdnet_stm32.models import build_model, format_summary, model_summary
    from birdnet_stm32.training.callbacks import (
        CHECKPOINT_DIR,
        LAST_MODEL,
        RunCheckpointer,
        ValidationMetrics,
        load_state,
    )
    from birdnet_stm32.training.schedules import build_schedule

    state = None
    if resume is not None:
        run_dir = Path(resume)
        state = load_state(run_dir)
        if state is None:
            raise UserError(f"--resume {run_dir}: no checkpoint to resume from (checkpoint/last.keras missing)")
        cfg = Config.load(run_dir / CONFIG_FILE).validate()
        args = json.loads((run_dir / RUN_ARGS_FILE).read_text())
        data_dir, val_dir = args["data_dir"], args["val_dir"]
        lr_info = args["lr"]
    else:
        run_dir = Path(out_dir)
        lr_info = None
    if not Path(data_dir).is_dir():
        raise UserError(f"--data {data_dir}: folder does not exist")
    run_dir.mkdir(parents=True, exist_ok=True)
    set_global_seed(cfg.train.seed)

    train_set, val_set = prepare_datasets(data_dir, cfg.audio, cfg.data, seed=cfg.train.seed, val_dir=val_dir)
    labels = list(train_set.classes)
    steps_per_epoch = max(1, math.ceil(len(train_set.y) / cfg.train.batch_size))
    weights = class_weights(train_set.y) if cfg.train.class_weights else None
    train_ds = _train_dataset(cfg, train_set, weights)
    strategy = make_strategy(cfg.train.strategy)
    log.info(
        "Training on %d chunks, validating on %d chunks, %d classes, %d replica(s), %d steps/epoch",
        len(train_set.y),
        len(val_set.y),
        len(labels),
        strategy.num_replicas_in_sync,
        steps_per_epoch,
    )

    with strategy.scope():
        if state is not None:
            model = keras.saving.load_model(run_dir / CHECKPOINT_DIR / LAST_MODEL, safe_mode=True)
        else:
            model = build_model(cfg.audio, cfg.model, len(labels))
    summary = model_summary(model)
    print(format_summary(summary))

    if lr_info is None:
        lr_info = _choose_lr(model, cfg, train_set, weights, run_dir, strategy)
        atomic_write_text(
            run_dir / RUN_ARGS_FILE,
            json.dumps({"data_dir": str(data_dir), "val_dir": str(val_dir) if val_dir else None, "lr": lr_info}),
        )
        with strategy.scope():
            schedule = build_schedule(
                cfg.train.schedule, lr_info["peak_lr"], steps_per_epoch, cfg.train.epochs, cfg.train.warmup_epochs
            )
            _compile(model, cfg, schedule)
    print(f"Learning rate: {cfg.train.schedule} schedule, peak {lr_info['peak_lr']:.3g} ({lr_info['source']})")
    cfg.train.lr = lr_info["peak_lr"]
    cfg.save(run_dir / CONFIG_FILE)
    _write_run_files(run_dir, cfg, labels, summary, lr_info, data_dir, val_dir, len(train_set.y), len(val_set.y))

    checkpointer = RunCheckpointer(run_dir, monitor="val_accuracy", patience=cfg.train.patience, state=state)
    callbacks = [ValidationMetrics(val_set.x, val_set.y, cfg.model.multi_label), checkpointer]
    initial_epoch = state["epoch"] if state else 0
    interrupted = False
    t0 = time.perf_counter()
    try:
        if initial_epoch < cfg.train.epochs:
            model.fit(
                train_ds,
                epochs=cfg.train.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch,
                callbacks=callbacks,
                shuffle=False,  # the tf.data pipeline shuffles itself, seeded
                verbose=1 if log.isEnabledFor(logging.INFO) else 0,
            )
    except KeyboardInterrupt:
        interrupted = True
        print(f"\nInterrupted: kept the best model and the last completed epoch; continue with --resume {run_dir}")
    best_row = next((r for r in checkpointer.history if r["epoch"] == checkpointer.best_epoch), {})
    result = TrainResult(
        run_dir=run_dir,
        lr=lr_info["peak_lr"],
        found_lr=lr_info.get("found_lr"),
        epochs=len(checkpointer.history),
        best_epoch=checkpointer.best_epoch,
        val_accuracy=float(best_row.get("val_accuracy", float("nan"))),
        history=checkpointer.history,
        interrupted=interrupted,
    )
    print(
        f"Best epoch {result.best_epoch}: val accuracy {result.val_accuracy:.3f} -> {run_dir / MODEL_FILE} "
        f"({len(checkpointer.history)} epochs, {time.perf_counter() - t0:.0f} s)"
    )
    if interrupted:
        raise KeyboardInterrupt
    return result


def _choose_lr(model, cfg: Config, train_set, weights, run_dir: Path, strategy) -> dict[str, Any]:
    """Pick the schedule's peak LR: LR finder, then ``--lr``, then the default."""
    if not cfg.train.find_lr:
        if cfg.train.lr > 0:
            return {"peak_lr": cfg.train.lr, "source": "--lr", "found_lr": None}
        return {"peak_lr": DEFAULT_LR, "source": "default", "found_lr": None}
    from birdnet_stm32.training.schedules import build_schedule

    with strategy.scope():
        # The sweep clones this optimizer (class and hyperparameters) and replaces its LR.
        _compile(model, cfg, build_schedule(cfg.train.schedule, DEFAULT_LR, 100, 1))
    result = _find_lr(model, cfg, train_set, weights, run_dir, strategy, probe=cfg.train.schedule == "constant")
    print(result.summary())
    if not result.ok:
        if cfg.train.lr > 0:
            print(f"LR finder failed ({result.error}); falling back to --lr {cfg.train.lr:g}")
            return {
                "peak_lr": cfg.train.lr,
                "source": "--lr fallback after a bad sweep",
                "found_lr": None,
                "finder": _finder_info(result),
            }
        raise UserError(f"--find-lr: {result.error} (or give --lr X as a fallback)")
    found = float(result.lr_for_schedule(cfg.train.schedule))
    print(
        f"LR finder: recommended {found:.3g} as the {cfg.train.schedule} schedule's peak "
        f"(constant-LR recommendation {result.recommended_lr:.3g})"
    )
    return {"peak_lr": found, "source": "--find-lr", "found_lr": found, "finder": _finder_info(result)}


def _finder_info(result) -> dict[str, Any]:
    return {
        "suggestions": result.suggestions,
        "recommended_lr": result.recommended_lr,
        "recommended_peak_lr": result.recommended_peak_lr,
        "stop_reason": result.stop_reason,
        "error": result.error,
        "warnings": list(result.warnings),
    }


def _write_run_files(run_dir, cfg, labels, summary, lr_info, data_dir, val_dir, n_train, n_val) -> None:
    from birdnet_stm32.audio.features import frontend_contract

    atomic_write_text(run_dir / LABELS_FILE, "\n".join(labels) + "\n")
    save_model_config(
        run_dir,
        {
            "labels": labels,
            "audio": cfg.to_dict()["audio"],
            "frontend": frontend_contract(cfg.audio),
            "model": cfg.to_dict()["model"],
            "summary": summary,
            "data": {
                "train_dir": str(data_dir),
                "val_dir": str(val_dir) if val_dir else None,
                "seed": cfg.train.seed,
                "val_fraction": cfg.data.val_fraction,
                "train_chunks": n_train,
                "val_chunks": n_val,
            },
            "training": cfg.to_dict()["train"],
            "lr_finder": lr_info,
        },
    )
