"""Learning rate finder — exponential sweep to find optimal LR range.

Implements the LR range test: the learning rate grows exponentially from ``min_lr`` to ``max_lr`` over
``num_steps`` optimizer steps while the true loss of every step is recorded; the loss curve then says which
learning rates train fast and where training blows up. The analysis (smoothing, divergence rule, suggestion
rules, verdict) lives in :mod:`birdnet_stm32.training.lr_analysis`; this module runs the sweep on Keras 3:

- :func:`find_lr` sweeps a **clone** of the model compiled like the original (a clone of its optimizer with the
  LR replaced, its loss, loss weights and metrics), cycles finite data, works under ``tf.distribute``
  strategies, mixed precision and ``steps_per_execution > 1``, and leaves the model, its optimizer, its compile
  settings and every random state exactly as they were. With ``probe_steps`` it then trains short constant-LR
  probes around the ``valley`` suggestion to pick the constant LR. It returns an
  :class:`~birdnet_stm32.training.lr_analysis.LRFinderResult`.
- :func:`run_lr_finder` is the same sweep returning just the recommended constant learning rate.
- :class:`LRFinder` is the Keras callback behind both; it can also be passed to your own ``model.fit``.

How the loss is measured: Keras reports the epoch's running mean in ``logs["loss"]``, and with
``steps_per_execution > 1`` callbacks see only every k-th step. The callback therefore wraps the model's
``compute_loss`` so that, inside the compiled train step, the loss and the batch size of each optimizer step are
written into a small buffer (one row per step, summed over replicas), which the callback reads every few steps.
The learning rate of each step is known on the host (the sweep schedule's value, or the value assigned before the
execution), so the train step does no extra work for it. Steps that a mixed-precision loss-scale optimizer skips
(non-finite gradients) do not advance the optimizer's iteration counter, so they neither advance the sweep nor
count as divergence.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import logging
import platform
import random
import time
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from birdnet_stm32.training.lr_analysis import (
    DivergenceMonitor,
    LRFinderError,
    LRFinderResult,
    check_sweep_args,
    sweep_lrs,
)

log = logging.getLogger(__name__)

#: Consecutive skipped loss-scale steps after which the sweep stops (the loss itself is no longer finite).
MAX_SKIPPED_IN_A_ROW = 30
#: The callback reads the recorded steps every this many steps (a device read costs ~30 us, a lot next to a tiny
#: model's step); stopping on divergence is then a few steps late, which only runs a few more steps past the stop
#: point (they are not used).
READ_EVERY = 4


class _SweepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The sweep's LR of optimizer step ``step``: ``sweep_lrs(...)[step - offset]``, held at the ends.

    A lookup in the table of the host's own values (``gather``), so the LR applied and the LR recorded are the
    same number, and the train step runs 4 small ops for it instead of an ``exp`` chain.
    """

    def __init__(self, min_lr: float, max_lr: float, num_steps: int, offset: int = 0):
        self.min_lr = float(min_lr)
        self.max_lr = float(max_lr)
        self.num_steps = int(num_steps)
        self.offset = int(offset)

    def __call__(self, step):
        table = tf.constant(sweep_lrs(self.min_lr, self.max_lr, self.num_steps), tf.float32)
        row = tf.clip_by_value(tf.cast(step, tf.int64) - self.offset, 0, self.num_steps - 1)
        return tf.gather(table, row)

    def get_config(self) -> dict[str, Any]:
        return {"min_lr": self.min_lr, "max_lr": self.max_lr, "num_steps": self.num_steps, "offset": self.offset}


class _LossRecorder:
    """Writes loss and batch size of every optimizer step into a buffer, inside the compiled train step.

    Row ``i < capacity`` belongs to optimizer step ``start + i`` and holds ``(loss, batch)``, each summed over
    replicas; row ``capacity`` takes the steps past the end. Keras has already divided each replica's loss by the
    number of replicas (their gradients are summed), so the sum is the mean of the replicas' batch losses: the
    loss the optimizer step minimized. A step that the loss-scale optimizer skips does not advance
    ``iterations``; the next step overwrites its row, so only rows below ``iterations - start`` are final,
    and ``count_batches`` adds a counter of the batches run. Without skipped steps the rows are written in order
    and the written rows (batch > 0) are the steps run. The write is 9 small ops: the step's row from
    ``iterations`` and one in-place scatter.
    """

    def __init__(self, model: keras.Model, capacity: int, start: int, count_batches: bool = False):
        self.model = model
        self.capacity = capacity
        self.start = start
        self.replicas = model.distribute_strategy.num_replicas_in_sync
        self.traced = False  # set when the train step calls compute_loss (checked after the first execution)
        sync = {
            "trainable": False,
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.SUM,
        }
        with model.distribute_strategy.scope():
            self.buffer = tf.Variable(tf.zeros([capacity + 1, 2]), name="lr_finder_buffer", **sync)
            self.batches = tf.Variable(0.0, name="lr_finder_batches", **sync) if count_batches else None
        original = model.compute_loss
        takes_training = "training" in inspect.signature(original).parameters

        def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
            if takes_training:
                loss = original(x, y, y_pred, sample_weight, training=training)
            else:
                loss = original(x, y, y_pred, sample_weight)
            if training:
                self._record(x, loss)
            return loss

        model.compute_loss = compute_loss

    def _record(self, x: Any, loss: Any) -> None:
        self.traced = True
        first = next(t for t in tf.nest.flatten(x) if t is not None)
        batch = tf.cast(tf.shape(first)[0], tf.float32)
        row = tf.minimum(tf.cast(self.model.optimizer.iterations, tf.int64) - self.start, self.capacity)
        values = tf.stack([tf.cast(loss, tf.float32), batch])[None]
        # In place; the raw op because replica-local (ON_READ) variables have no scatter_update method.
        tf.raw_ops.ResourceScatterUpdate(resource=self.buffer.handle, indices=row[None], updates=values)
        if self.batches is not None:
            self.batches.assign_add(1.0)

    def read(self) -> np.ndarray:
        """The buffer, summed over replicas: ``(loss, batch)`` per step."""
        return self.buffer.numpy()

    def batches_run(self) -> int:
        """Batches run since the start, skipped steps included (``count_batches`` only; a device read)."""
        return int(round(float(self.batches.numpy()) / self.replicas))

    def applied_steps(self) -> int:
        """Optimizer steps applied since the start (a device read)."""
        return int(self.model.optimizer.iterations.numpy()) - self.start

    def remove(self) -> None:
        """Give the model its own ``compute_loss`` back."""
        del self.model.compute_loss


class LRFinder(keras.callbacks.Callback):
    """Exponential LR sweep callback.

    Increases the learning rate from ``min_lr`` to ``max_lr`` over ``num_steps`` optimizer steps and records the
    true loss of every step (not the epoch's running mean), stopping early when the smoothed loss diverges or the
    loss becomes non-finite. Use :func:`find_lr` to sweep without touching your model; used directly in
    ``model.fit`` the callback trains the model it is attached to (save its weights first) and needs data for
    ``num_steps`` steps (``steps_per_epoch=num_steps`` on a repeating dataset).

    How the learning rate is driven: if the optimizer's learning rate is a variable (built from a float), it is
    assigned before each batch (``steps_per_execution=k`` then holds it for k steps, and the recorded LR says
    so); if it is a ``LearningRateSchedule``, a sweep schedule replaces it for the duration of ``fit`` (exact per
    step) and the original schedule is put back at the end. Either way the LR advances by optimizer steps, so
    steps skipped by a mixed-precision loss-scale optimizer do not advance it.

    Args:
        min_lr: Starting learning rate.
        max_lr: Ending learning rate.
        num_steps: Number of training steps in the sweep.
        smoothing: Span in steps of the bias-corrected EMA used for the online divergence rule and, by default,
            for the analysis.
        progress: Show a progress bar with step, learning rate and smoothed loss.

    Raises:
        LRFinderError: An argument is invalid (``min_lr <= 0``, ``min_lr >= max_lr``, ``num_steps < 10``, ...).

    Examples:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        >>> model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        >>> x, y = np.random.rand(64, 4).astype("float32"), np.random.randint(0, 3, 64)
        >>> finder = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=30, progress=False)
        >>> _ = model.fit(x, y, batch_size=8, epochs=4, callbacks=[finder], verbose=0)
        >>> len(finder.lrs) == len(finder.losses) <= 30
        True
    """

    def __init__(
        self,
        min_lr: float = 1e-7,
        max_lr: float = 1.0,
        num_steps: int = 200,
        smoothing: int = 5,
        progress: bool = True,
    ):
        super().__init__()
        check_sweep_args(min_lr, max_lr, num_steps, smoothing)
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.num_steps = num_steps
        self.smoothing = smoothing
        self.progress = progress
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.batch_sizes: list[float] = []
        self.stop_reason: str | None = None
        self.skipped_steps = 0
        self.wall_time = 0.0
        self._schedule = sweep_lrs(min_lr, max_lr, num_steps)
        self._recorder: _LossRecorder | None = None
        self._assign_lr = False
        self._original_lr: Any = None
        self._loss_scaled = False
        self._dispatched = 0  # steps dispatched: exact after a read (an epoch's last execution can run short)
        self._latest = 0  # steps run (final rows) at the last read
        self._batches_at_progress = 0
        self._unread = 0
        self._stop_scheduled = False
        self._assigned: tuple[list[int], list[float]] = ([], [])  # (first row, LR) of every LR assignment
        self._monitor = DivergenceMonitor(smoothing)
        self._bar: Any = None
        self._t0 = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Install the sweep: learning-rate driver, per-step loss recorder and progress bar.

        Args:
            logs: Unused (Keras callback signature).

        Raises:
            LRFinderError: The model is not compiled.
        """
        optimizer = self.model.optimizer
        if optimizer is None:
            raise LRFinderError("LRFinder: the model has no optimizer; compile it first (or use find_lr())")
        self.lrs, self.losses, self.batch_sizes = [], [], []
        self.stop_reason, self.skipped_steps = None, 0
        self._dispatched, self._latest, self._batches_at_progress, self._unread = 0, 0, 0, 0
        self._stop_scheduled = False
        self._assigned = ([], [])
        self._monitor = DivergenceMonitor(self.smoothing)
        start = int(optimizer.iterations.numpy())
        self._loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self._assign_lr = isinstance(optimizer.learning_rate, keras.Variable)
        self._original_lr = float(optimizer.learning_rate.numpy()) if self._assign_lr else None
        if not self._assign_lr:
            current = _inner_optimizer(optimizer)._learning_rate  # the schedule object; no public getter
            if not isinstance(current, _SweepSchedule):
                self._original_lr = current
                optimizer.learning_rate = _SweepSchedule(self.min_lr, self.max_lr, self.num_steps, offset=start)
        self._recorder = _LossRecorder(self.model, self.num_steps, start, count_batches=self._loss_scaled)
        self.model.make_train_function(force=True)
        self._bar = tqdm(total=self.num_steps, desc="LR sweep", unit="step", disable=not self.progress, leave=False)
        self._t0 = time.perf_counter()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Set LR for the current step (when the optimizer's learning rate is a variable).

        The learning rate of optimizer step ``i`` of the sweep is ``min_lr * (max_lr / min_lr) ** (i /
        (num_steps - 1))``. With a schedule-driven optimizer the sweep schedule computes it inside the train
        step instead. Without a loss-scale optimizer no step is skipped, so the execution that brings the sweep
        to ``num_steps`` steps is known in advance and training stops after it.

        Args:
            batch: Index of the batch within the epoch (unused: the sweep follows optimizer steps).
            logs: Unused.
        """
        if self._assign_lr:
            row = self._recorder.applied_steps() if self._loss_scaled else self._dispatched
            lr = float(self._schedule[min(row, self.num_steps - 1)])
            self.model.optimizer.learning_rate = lr
            self._assigned[0].append(row)
            self._assigned[1].append(lr)
        self._dispatched += self.model.steps_per_execution
        if not self._loss_scaled and self._dispatched >= self.num_steps and not self.model.stop_training:
            self.model.stop_training = self._stop_scheduled = True

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Record LR and loss of the steps just run, apply the divergence rule, stop when done.

        The recorded steps are read every 4 steps (``READ_EVERY``; a device read costs ~30 us), after every
        execution when ``steps_per_execution > 1`` (an epoch's last execution can run fewer steps) and before
        a scheduled stop.

        Args:
            batch: Index of the last batch run (unused).
            logs: Unused: ``logs["loss"]`` is the epoch's running mean, not the loss of the step.

        Raises:
            LRFinderError: The model's ``train_step`` does not call ``compute_loss``, so no loss was recorded.
        """
        spe = self.model.steps_per_execution
        self._unread += spe
        if self._unread < READ_EVERY and spe == 1 and not self._stop_scheduled:
            return
        self._unread = 0
        self._read()
        if self.stop_reason is not None:
            self.model.stop_training = True
        elif self._stop_scheduled:  # the execution ran short (end of the data): go on
            self.model.stop_training = self._stop_scheduled = False

    def on_train_end(self, logs: dict | None = None) -> None:
        """Record the last steps, remove the sweep and restore the optimizer's LR and the model's ``compute_loss``.

        Args:
            logs: Unused.
        """
        self.wall_time = time.perf_counter() - self._t0
        try:
            self._read()
        finally:
            self._recorder.remove()
            self._recorder = None
            if self._original_lr is not None:  # a float for an LR variable, else the user's schedule
                self.model.optimizer.learning_rate = self._original_lr
                self._original_lr = None
            self.model.make_train_function(force=True)
            self._bar.close()
        if self.stop_reason is None:
            self.stop_reason = "ended_early"

    def _read(self) -> None:
        """Read the buffer: take the final rows, count skipped steps, decide whether the sweep is done."""
        buffer = self._recorder.read()
        if not self._recorder.traced:
            raise LRFinderError(
                "LRFinder: no loss was recorded for a training step; the model's train_step must call "
                "self.compute_loss()"
            )
        if self._loss_scaled:
            steps, batches = self._recorder.applied_steps(), self._recorder.batches_run()
        else:  # rows are written in order: the written ones are the steps run
            steps = self._latest
            while steps < self.num_steps and buffer[steps, 1] > 0:
                steps += 1
            if steps < self.num_steps:  # (past the end all steps write the overflow row)
                self._dispatched = steps
            batches = steps
        self._consume(buffer, steps)
        self.skipped_steps = batches - steps
        if steps > self._latest:
            self._latest, self._batches_at_progress = steps, batches
        if self.stop_reason is None and batches - self._batches_at_progress > MAX_SKIPPED_IN_A_ROW:
            self.stop_reason = "loss_scale_stall"
        if self.stop_reason is None and steps >= self.num_steps:
            self.stop_reason = "completed"

    def _consume(self, buffer: np.ndarray, final_rows: int) -> None:
        """Take the final rows not seen yet, feed the divergence rule and the progress bar."""
        if self.stop_reason in ("diverged", "non_finite"):
            return
        first = len(self.losses)
        for i in range(first, min(final_rows, self.num_steps)):
            self.lrs.append(self._lr_of_row(i))
            self.losses.append(float(buffer[i, 0]))
            self.batch_sizes.append(float(buffer[i, 1]))
            reason = self._monitor.update(self.losses[-1])
            if reason:
                self.stop_reason = reason
                break
        if len(self.losses) > first and not self._bar.disable:
            smoothed = self._monitor.smoothed[-1] if self._monitor.smoothed else float("nan")
            self._bar.set_postfix_str(f"lr={self.lrs[-1]:.2e} loss={smoothed:.4g}", refresh=False)
            self._bar.update(len(self.losses) - first)

    def _lr_of_row(self, row: int) -> float:
        """The LR optimizer step ``row`` of the sweep ran with.

        With a schedule it is the sweep schedule's value; with an assigned LR it is the value assigned last before
        the execution that ran the step (a later execution overwrites the rows of skipped loss-scale steps).
        """
        if not self._assign_lr:
            return float(self._schedule[row])
        starts, lrs = self._assigned
        return lrs[bisect.bisect_right(starts, row) - 1]

    def result(self, smoothing: int | None = None, metadata: dict[str, Any] | None = None) -> LRFinderResult:
        """Analyse the recorded sweep.

        Args:
            smoothing: EMA span in steps (default: the callback's ``smoothing``).
            metadata: Extra context to store in the result.

        Returns:
            The :class:`~birdnet_stm32.training.lr_analysis.LRFinderResult` (check ``ok``).
        """
        meta = {
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
            "batch_size": int(np.median(self.batch_sizes)) if self.batch_sizes else None,
            "skipped_steps": self.skipped_steps,
            "wall_time_s": round(self.wall_time, 3),
            **(metadata or {}),
        }
        return LRFinderResult.from_sweep(
            self.lrs,
            self.losses,
            smoothing=smoothing or self.smoothing,
            num_steps=self.num_steps,
            stop_reason=self.stop_reason,
            metadata=meta,
        )

    def suggest_lr(self, smoothing: int = 5) -> float:
        """Return the recommended constant learning rate of the recorded sweep.

        This is the ``valley`` rule on the lag-corrected, EMA-smoothed curve (see
        :mod:`~birdnet_stm32.training.lr_analysis`); use :meth:`result` for every rule and for the peak LR of a
        warmup-cosine or one-cycle schedule.

        Args:
            smoothing: EMA span in steps (same centre of mass as a moving average of this window size).

        Returns:
            Suggested learning rate.

        Raises:
            LRFinderError: The sweep cannot be trusted (loss never fell, diverged at once, too few finite
                points); the message says which range to try.
        """
        result = self.result(smoothing)
        result.raise_for_status()
        return float(result.recommended_lr)

    def plot(self, path: str | None = None, suggested_lr: float | None = None) -> None:
        """Plot LR vs loss curve.

        Marks every rule's suggestion, the recommendations and the stop point on a log-scale LR axis (see
        :meth:`~birdnet_stm32.training.lr_analysis.LRFinderResult.plot`).

        Args:
            path: If given, saves to this file (PNG). Otherwise calls plt.show().
            suggested_lr: If given, draws a vertical line at the suggested LR.
        """
        self.result().plot(path, suggested_lr=suggested_lr)
        if path:
            log.info("LR finder plot saved to %s", path)


def find_lr(
    model: keras.Model,
    data: Any,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_steps: int = 200,
    loss_fn: str | keras.losses.Loss = "categorical_crossentropy",
    batch_size: int = 32,
    seed: int | None = None,
    smoothing: int = 5,
    strategy: tf.distribute.Strategy | None = None,
    steps_per_execution: int | None = None,
    progress: bool = True,
    probe_steps: int = 0,
) -> LRFinderResult:
    """Run an LR range test on a clone of ``model`` and return everything it found.

    The sweep trains a clone of the model (same architecture and weights, BatchNorm statistics included). If the
    model is compiled, the clone is compiled like it: a clone of its optimizer (same class and hyperparameters,
    learning rate replaced by the sweep, loss-scale wrapper kept), its loss, loss weights and (fresh copies of)
    its metrics, its ``steps_per_execution`` and ``jit_compile``. Otherwise Adam and ``loss_fn`` are used.
    Afterwards the model, its optimizer (variables and iteration count), its compile settings, its seed
    generators and the global Python, NumPy, Keras and TensorFlow random states are exactly as before.

    Args:
        model: Compiled or uncompiled Keras model (functional, sequential or a subclass with ``get_config``).
        data: A batched ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)`` (finite datasets are
            repeated), or numpy arrays ``(x, y)`` / ``(x, y, sample_weight)`` (shuffled with ``seed`` and
            batched by ``batch_size``).
        min_lr: Starting learning rate.
        max_lr: Ending learning rate.
        num_steps: Number of optimizer steps in the sweep.
        loss_fn: Loss of an uncompiled model (a compiled model keeps its own).
        batch_size: Batch size for numpy ``data`` (a dataset keeps its own batching).
        seed: Seed for the sweep's own randomness (shuffling, dropout, initialization of unbuilt layers);
            ``None`` draws from the current global states, which are restored afterwards either way.
        smoothing: EMA span in steps for the divergence rule and the analysis.
        strategy: ``tf.distribute`` strategy to sweep under (default: the one the model was built in).
        steps_per_execution: Steps per compiled call (default: the model's own, else 1). Under a multi-replica
            strategy Keras 3 cannot run more than 1 (keras-team/keras#19246); the sweep then uses 1 and warns.
        progress: Show a progress bar with step, learning rate and smoothed loss.
        probe_steps: If > 0, after a good sweep train the clone for this many steps at each constant LR of
            :meth:`~birdnet_stm32.training.lr_analysis.LRFinderResult.probe_lrs` (from the starting weights and
            a fresh optimizer each time) and recommend as constant LR the minimum of their losses over the last
            half of their steps (:meth:`~birdnet_stm32.training.lr_analysis.LRFinderResult.with_probes`; about
            ``4 x probe_steps`` more steps; 100 is the measured choice, see ``docs/lr-finder.md``).

    Returns:
        The :class:`~birdnet_stm32.training.lr_analysis.LRFinderResult`: arrays, every rule's suggestion,
        ``recommended_lr`` (constant), ``recommended_peak_lr`` (warmup-cosine/one-cycle peak), stop reason,
        warnings, ``ok`` and metadata. A bad sweep gives ``ok=False`` and an ``error`` that says which range to
        try; nothing is guessed.

    Raises:
        LRFinderError: Invalid arguments, data of an unsupported type or shape, or a model that cannot be cloned.

    Examples:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
        ...                           keras.layers.Dense(2, activation="softmax")])
        >>> x = np.random.default_rng(0).normal(size=(512, 8)).astype("float32")
        >>> y = keras.utils.to_categorical(x[:, 0] > 0, 2)
        >>> result = find_lr(model, (x, y), min_lr=1e-5, max_lr=10.0, num_steps=100, seed=0, progress=False)
        >>> result.ok and result.recommended_lr < result.recommended_peak_lr
        True
    """
    check_sweep_args(min_lr, max_lr, num_steps, smoothing, probe_steps)
    strategy = strategy or model.distribute_strategy
    compiled = bool(getattr(model, "compiled", False)) and model.optimizer is not None
    extra_warnings = []
    spe = steps_per_execution or (int(model.steps_per_execution) if compiled else 1)
    if spe > 1 and strategy.num_replicas_in_sync > 1:
        extra_warnings.append(
            f"steps_per_execution={spe} is not supported by Keras 3 under a {strategy.num_replicas_in_sync}-replica "
            "strategy (keras-team/keras#19246); the sweep used 1"
        )
        spe = 1
    t0 = time.perf_counter()
    with _isolated_random_state(seed):
        dataset = _as_dataset(data, model, batch_size, seed)
        with strategy.scope():
            clone = _clone_model(model)
            schedule = _SweepSchedule(min_lr, max_lr, num_steps)
            optimizer = _clone_optimizer(model.optimizer if compiled else None, schedule)
            clone.compile(**_compile_kwargs(model if compiled else None, optimizer, loss_fn, spe))
        finder = LRFinder(min_lr, max_lr, num_steps, smoothing=smoothing, progress=progress)
        start: list[np.ndarray] = []  # the clone's weights when the sweep starts (built by then)
        snapshot = keras.callbacks.LambdaCallback(on_train_begin=lambda _: start.extend(clone.get_weights()))
        clone.fit(
            dataset,
            epochs=1,
            steps_per_epoch=2 * num_steps + MAX_SKIPPED_IN_A_ROW,
            shuffle=False,
            verbose=0,
            callbacks=[snapshot, finder],
        )
        result = finder.result(
            metadata={
                "seed": seed,
                "optimizer": _optimizer_info(clone.optimizer),
                "loss": _describe(clone.loss),
                "model_compiled": compiled,
                "steps_per_execution": spe,
                "replicas": strategy.num_replicas_in_sync,
                "dtype_policy": clone.dtype_policy.name,
                "step_time_ms": round(1000 * finder.wall_time / max(len(finder.losses), 1), 2),
                "total_time_s": round(time.perf_counter() - t0, 3),
                "versions": _versions(),
            }
        )
        if probe_steps and result.ok:
            with strategy.scope():
                optimizer = _clone_optimizer(model.optimizer if compiled else None, 1e-3)
                clone.compile(**_compile_kwargs(model if compiled else None, optimizer, loss_fn, spe))
                lrs = result.probe_lrs()
                runs = _probe(clone, dataset, lrs, probe_steps, start, progress)
            result = result.with_probes(lrs, runs)
            result.metadata["total_time_s"] = round(time.perf_counter() - t0, 3)
    result.warnings.extend(extra_warnings)
    if result.ok:
        log.info(
            "LR finder: constant LR %.3g, schedule peak LR %.3g", result.recommended_lr, result.recommended_peak_lr
        )
    else:
        log.warning("LR finder: bad sweep: %s", result.error)
    return result


def run_lr_finder(
    model: keras.Model,
    dataset: tf.data.Dataset,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    num_steps: int = 200,
    loss_fn: str | keras.losses.Loss = "categorical_crossentropy",
    plot_path: str | None = None,
) -> float:
    """Run an LR range test and return the suggested learning rate.

    The sweep runs on a clone of the model (see :func:`find_lr`): the model, its optimizer, compile settings and
    random states are left exactly as they were — no permanent changes.

    Args:
        model: Compiled or uncompiled Keras model.
        dataset: Training dataset (batched; finite datasets are repeated), or numpy ``(x, y)`` arrays.
        min_lr: Starting learning rate.
        max_lr: Ending learning rate.
        num_steps: Number of sweep steps.
        loss_fn: Loss function (used when the model is not compiled).
        plot_path: Optional path to save the LR-vs-loss plot.

    Returns:
        Suggested optimal learning rate: the recommended constant LR. For the peak of a warmup-cosine or one-cycle
        schedule use ``find_lr(...).lr_for_schedule("cosine")``.

    Raises:
        LRFinderError: Invalid arguments or a bad sweep (loss never fell, diverged at once, too few finite
            points); the message says which range to try. The plot is written first.
    """
    result = find_lr(model, dataset, min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, loss_fn=loss_fn)
    if plot_path:
        result.plot(plot_path)
        log.info("LR finder plot saved to %s", plot_path)
    result.raise_for_status()
    log.info("Suggested LR: %.2e", result.recommended_lr)
    return float(result.recommended_lr)


def _probe(
    clone: keras.Model, dataset: tf.data.Dataset, lrs: list[float], steps: int, start: list[np.ndarray], progress: bool
) -> list[np.ndarray]:
    """Train ``clone`` for ``steps`` steps at each constant LR from the weights ``start`` and a fresh optimizer.

    Returns the true loss of every applied step of each run (recorded in the train step like the sweep's).
    """
    optimizer = clone.optimizer
    optimizer.build(clone.trainable_variables)
    fresh = [v.numpy() for v in optimizer.variables]  # iterations included: every run writes rows from 0
    recorder = _LossRecorder(clone, steps, start=0)
    clone.make_train_function(force=True)
    runs = []
    try:
        for lr in tqdm(lrs, desc="LR probes", unit="probe", disable=not progress, leave=False):
            clone.set_weights(start)
            for var, value in zip(optimizer.variables, fresh, strict=True):
                var.assign(value)
            _inner_optimizer(optimizer).learning_rate = lr
            clone.fit(dataset, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
            runs.append(recorder.read()[: min(recorder.applied_steps(), steps), 0].astype(np.float64))
    finally:
        recorder.remove()
        clone.make_train_function(force=True)
    return runs


def _inner_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


def _clone_optimizer(
    optimizer: keras.optimizers.Optimizer | None, learning_rate: keras.optimizers.schedules.LearningRateSchedule
) -> keras.optimizers.Optimizer:
    """A fresh optimizer of the same class and hyperparameters with ``learning_rate`` (Adam if ``None``)."""
    if optimizer is None:
        return keras.optimizers.Adam(learning_rate)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        inner = _clone_optimizer(optimizer.inner_optimizer, learning_rate)
        return keras.optimizers.LossScaleOptimizer(
            inner, initial_scale=optimizer.initial_scale, dynamic_growth_steps=optimizer.dynamic_growth_steps
        )
    config = optimizer.get_config()
    config["learning_rate"] = learning_rate
    return type(optimizer).from_config(config)


def _clone_model(model: keras.Model) -> keras.Model:
    try:
        clone = keras.models.clone_model(model)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise LRFinderError(
            f"find_lr: cannot clone the model {model.name!r} ({type(exc).__name__}: {exc}); give a subclassed "
            "model a get_config() so keras.models.clone_model can rebuild it"
        ) from exc
    if model.built and model.weights:
        clone.set_weights(model.get_weights())
    return clone


def _compile_kwargs(
    model: keras.Model | None, optimizer: keras.optimizers.Optimizer, loss_fn: Any, steps_per_execution: int
) -> dict[str, Any]:
    """Compile arguments of the sweep clone: the model's own (with fresh metrics) or Adam + ``loss_fn``."""
    if model is None:
        return {"optimizer": optimizer, "loss": loss_fn, "steps_per_execution": steps_per_execution}
    kwargs = dict(model._compile_config.config)  # the arguments given to compile(); Keras keeps no public copy
    kwargs.update(
        optimizer=optimizer,
        metrics=_fresh_metrics(kwargs.get("metrics")),
        weighted_metrics=_fresh_metrics(kwargs.get("weighted_metrics")),
        steps_per_execution=steps_per_execution,
        auto_scale_loss=False,  # the cloned optimizer already has a loss-scale wrapper iff the model's had one
    )
    return kwargs


def _fresh_metrics(metrics: Any) -> Any:
    """Copy metric objects (they hold state) so the sweep never updates the model's own."""
    if isinstance(metrics, keras.metrics.Metric):
        return type(metrics).from_config(metrics.get_config())
    if isinstance(metrics, dict):
        return {k: _fresh_metrics(v) for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return type(metrics)(_fresh_metrics(m) for m in metrics)
    return metrics


def _as_dataset(data: Any, model: keras.Model, batch_size: int, seed: int | None) -> tf.data.Dataset:
    """A dataset that never runs out: finite datasets are repeated, numpy arrays shuffled and batched."""
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        if cardinality == 0:
            raise LRFinderError("find_lr: the dataset is empty")
        _check_batched(data, model)
        return data if cardinality == tf.data.INFINITE_CARDINALITY else data.repeat()
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        arrays = tuple(np.asarray(a) for a in data)
        n = len(arrays[0])
        if n == 0 or any(len(a) != n for a in arrays):
            raise LRFinderError(
                f"find_lr: data arrays must be non-empty and of equal length, got {[len(a) for a in arrays]}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LRFinderError(f"find_lr: batch_size (--batch-size) = {batch_size} must be an integer >= 1")
        ds = tf.data.Dataset.from_tensor_slices(arrays)
        return ds.shuffle(n, seed=0 if seed is None else seed).batch(batch_size).repeat()
    raise LRFinderError(
        f"find_lr: data must be a batched tf.data.Dataset or numpy arrays (x, y), got {type(data).__name__}"
    )


def _check_batched(data: tf.data.Dataset, model: keras.Model) -> None:
    inputs = getattr(model, "inputs", None)
    spec = tf.nest.flatten(data.element_spec)[0]
    if not inputs or spec.shape.rank is None:
        return
    if spec.shape.rank == len(inputs[0].shape) - 1:
        raise LRFinderError(
            f"find_lr: the dataset yields single examples of shape {tuple(spec.shape)}, but the model takes "
            "batches; call dataset.batch(batch_size) first"
        )


@contextlib.contextmanager
def _isolated_random_state(seed: int | None) -> Iterator[None]:
    """Run the sweep with its own random state and put every global random state back afterwards.

    Saved and restored: Python's ``random`` (Keras draws default seeds from it), NumPy's global state, Keras'
    global seed generator and TensorFlow's eager op-seed generator. ``tf.random.set_seed`` is never called: it
    also clears TensorFlow's kernel caches, which cannot be undone.
    """
    from keras.src.backend.common import global_state
    from tensorflow.python.eager import context

    py_state, np_state = random.getstate(), np.random.get_state()
    keras_gen = global_state.get_global_attribute("global_seed_generator")
    keras_gen_state = keras_gen.state.numpy() if keras_gen is not None else None
    ctx = context.context()
    tf_seed, tf_rng = ctx._seed, getattr(ctx, "_rng", None)
    tf_rng_state = tf_rng.getstate() if tf_rng is not None else None
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            global_state.set_global_attribute("global_seed_generator", None)  # recreated from `random` on demand
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        global_state.set_global_attribute("global_seed_generator", keras_gen)
        if keras_gen is not None:
            keras_gen.state.assign(keras_gen_state)
        ctx._seed, ctx._rng = tf_seed, tf_rng
        if tf_rng is not None:
            tf_rng.setstate(tf_rng_state)


def _optimizer_info(optimizer: keras.optimizers.Optimizer) -> dict[str, Any]:
    inner = _inner_optimizer(optimizer)
    config = {k: v for k, v in inner.get_config().items() if k != "learning_rate"}
    return {
        "class": type(inner).__name__,
        "loss_scale": isinstance(optimizer, keras.optimizers.LossScaleOptimizer),
        "config": {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in config.items()},
    }


def _describe(obj: Any) -> Any:
    if isinstance(obj, (str, type(None))):
        return obj
    if isinstance(obj, dict):
        return {k: _describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_describe(v) for v in obj]
    return getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__


def _versions() -> dict[str, str]:
    from birdnet_stm32 import __version__

    return {
        "birdnet_stm32": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


__all__ = ["LRFinder", "LRFinderError", "LRFinderResult", "find_lr", "run_lr_finder"]
