"""Learning-rate schedules keyed on optimizer steps: warmup + cosine, one-cycle, constant.

Every schedule takes the **peak** learning rate, the value the LR finder's
``recommended_peak_lr`` feeds (or ``recommended_lr`` for ``constant``), and the
true number of optimizer steps per epoch, so the shape is the same whatever the
batch size or dataset length. They are Keras ``LearningRateSchedule`` objects,
registered for serialization, so a checkpoint saved mid-run resumes at the same
point of the schedule (the position is the optimizer's ``iterations``).

Each class also has a NumPy twin, :func:`lr_curve`, used for plots and tests.
"""

from __future__ import annotations

import math

import keras
import numpy as np

SCHEDULES = ("cosine", "onecycle", "constant")


@keras.saving.register_keras_serializable(package="birdnet_stm32")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from ``peak_lr * warmup_start`` to ``peak_lr``, then cosine decay to ``peak_lr * final_scale``.

    Args:
        peak_lr: Learning rate at the end of the warmup.
        total_steps: Total optimizer steps of the run (epochs x steps per epoch).
        warmup_steps: Steps of linear warmup (clipped to ``total_steps - 1``).
        warmup_start: Warmup starts at this fraction of ``peak_lr``.
        final_scale: The decay ends at this fraction of ``peak_lr``.

    Examples:
        >>> s = WarmupCosine(1e-3, total_steps=100, warmup_steps=10)
        >>> round(float(s(10)), 6)
        0.001
    """

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_start: float = 0.01,
        final_scale: float = 0.01,
    ):
        self.peak_lr = float(peak_lr)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = min(max(int(warmup_steps), 0), self.total_steps - 1)
        self.warmup_start = float(warmup_start)
        self.final_scale = float(final_scale)

    def __call__(self, step):
        """Return the learning rate at optimizer step ``step``."""
        step = keras.ops.cast(step, "float32")
        warm = float(max(self.warmup_steps, 1))
        warm_lr = self.peak_lr * (self.warmup_start + (1.0 - self.warmup_start) * step / warm)
        decay_len = float(max(self.total_steps - self.warmup_steps, 1))
        progress = keras.ops.clip((step - self.warmup_steps) / decay_len, 0.0, 1.0)
        cosine = 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        decay_lr = self.peak_lr * (self.final_scale + (1.0 - self.final_scale) * cosine)
        return keras.ops.where(step < self.warmup_steps, warm_lr, decay_lr)

    def get_config(self) -> dict:
        """Return the constructor arguments (for serialization)."""
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_start": self.warmup_start,
            "final_scale": self.final_scale,
        }


@keras.saving.register_keras_serializable(package="birdnet_stm32")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """One-cycle policy: cosine rise from ``peak_lr / div_factor`` to ``peak_lr``, then cosine fall.

    Args:
        peak_lr: Highest learning rate, reached after ``pct_start`` of the run.
        total_steps: Total optimizer steps of the run.
        pct_start: Fraction of the run spent rising.
        div_factor: The cycle starts at ``peak_lr / div_factor``.
        final_div_factor: The cycle ends at ``peak_lr / (div_factor * final_div_factor)``.

    Examples:
        >>> s = OneCycle(1e-2, total_steps=100)
        >>> round(float(s(30)), 6)
        0.01
    """

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ):
        self.peak_lr = float(peak_lr)
        self.total_steps = max(int(total_steps), 2)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        """Return the learning rate at optimizer step ``step``."""
        step = keras.ops.cast(step, "float32")
        up_steps = max(float(round(self.pct_start * self.total_steps)), 1.0)
        down_steps = max(float(self.total_steps) - up_steps, 1.0)
        start = self.peak_lr / self.div_factor
        end = start / self.final_div_factor
        up = keras.ops.clip(step / up_steps, 0.0, 1.0)
        down = keras.ops.clip((step - up_steps) / down_steps, 0.0, 1.0)
        rising = start + (self.peak_lr - start) * 0.5 * (1.0 - keras.ops.cos(math.pi * up))
        falling = end + (self.peak_lr - end) * 0.5 * (1.0 + keras.ops.cos(math.pi * down))
        return keras.ops.where(step < up_steps, rising, falling)

    def get_config(self) -> dict:
        """Return the constructor arguments (for serialization)."""
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
        }


@keras.saving.register_keras_serializable(package="birdnet_stm32")
class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """A constant learning rate, as a schedule so every run logs its LR the same way.

    Args:
        peak_lr: The learning rate.

    Examples:
        >>> round(float(Constant(3e-4)(1000)), 6)
        0.0003
    """

    def __init__(self, peak_lr: float):
        self.peak_lr = float(peak_lr)

    def __call__(self, step):
        """Return the learning rate (independent of ``step``)."""
        return keras.ops.cast(self.peak_lr, "float32") + 0.0 * keras.ops.cast(step, "float32")

    def get_config(self) -> dict:
        """Return the constructor arguments (for serialization)."""
        return {"peak_lr": self.peak_lr}


def build_schedule(
    name: str,
    peak_lr: float,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 2.0,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Build a schedule by name for a run of ``epochs`` x ``steps_per_epoch`` optimizer steps.

    Args:
        name: ``"cosine"`` (linear warmup + cosine decay), ``"onecycle"`` or ``"constant"``.
        peak_lr: The schedule's highest learning rate (the constant LR for ``"constant"``).
        steps_per_epoch: Optimizer steps per epoch (``ceil(train examples / global batch)``).
        epochs: Number of epochs.
        warmup_epochs: Warmup length of ``"cosine"`` in epochs (at most 20 % of the run is used).

    Returns:
        The schedule.

    Raises:
        ValueError: Unknown name or non-positive ``peak_lr``.

    Examples:
        >>> s = build_schedule("cosine", 1e-3, steps_per_epoch=10, epochs=5)
        >>> type(s).__name__, s.warmup_steps
        ('WarmupCosine', 10)
    """
    if peak_lr <= 0 or not math.isfinite(peak_lr):
        raise ValueError(f"peak_lr must be a positive number, got {peak_lr}")
    total = max(int(steps_per_epoch) * int(epochs), 1)
    if name == "cosine":
        warmup = min(int(round(warmup_epochs * steps_per_epoch)), int(0.2 * total))
        return WarmupCosine(peak_lr, total_steps=total, warmup_steps=warmup)
    if name == "onecycle":
        return OneCycle(peak_lr, total_steps=total)
    if name == "constant":
        return Constant(peak_lr)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def lr_curve(schedule: keras.optimizers.schedules.LearningRateSchedule, steps: int) -> np.ndarray:
    """Evaluate a schedule at steps ``0 .. steps-1``.

    Args:
        schedule: Any Keras learning-rate schedule.
        steps: Number of steps to evaluate.

    Returns:
        Float array of shape ``(steps,)``.
    """
    values = schedule(keras.ops.arange(steps, dtype="float32"))
    return np.asarray(keras.ops.convert_to_numpy(values), dtype=np.float64).reshape(-1)
