"""Analysis of an LR range test in plain NumPy: smoothing, the divergence rule, the suggestion rules and the verdict.

Nothing here needs TensorFlow: :mod:`birdnet_stm32.training.lr_finder` records the sweep (learning rate and true
loss of every optimizer step) and hands the arrays to :meth:`LRFinderResult.from_sweep`, which applies the rules
below. They are plain functions so they can be tested, replayed on a saved ``lr_finder.csv`` and documented in
one place.

**Smoothing.** Per-batch losses are noisy, so they are smoothed with a bias-corrected exponential moving average
(EMA) of span ``N`` (``beta = 1 - 2 / (N + 1)``, the same centre of mass as an ``N``-step moving average). An EMA
is causal: its value at step ``t`` is a weighted mean of the losses at steps ``<= t`` whose centre lies
``lag_t = sum(k * beta**k) / sum(beta**k)`` steps back (``k = 0..t``; about ``(N - 1) / 2`` once ``t >> N``). For a
loss that changes linearly in step (that is, in log LR), the smoothed value at ``t`` is exactly the loss at step
``t - lag_t``, so every smoothed value is read at the learning rate of step ``t - lag_t`` (the *lag-corrected* LR,
interpolated in log space). Without this correction every rule would point ``lag_t`` steps too far right.

**Divergence.** With ``s`` the smoothed loss, ``m`` its running minimum, ``D`` the drop from the highest smoothed
value before that minimum to ``m`` and ``sigma`` the per-step loss noise (robust: median absolute deviation of
the first differences, divided by ``sqrt(2)``), the sweep has diverged at step ``t`` when::

    s[t] - m > max(DIVERGENCE_RISE * D, NOISE_K * sigma / sqrt(N))

i.e. the smoothed loss has climbed back more than half of what it gained, and by far more than its own noise
(``sigma / sqrt(N)`` is the noise left after smoothing). The first ``max(N, 10)`` steps only warm up the filter
and the noise estimate: a minimum set by the first, barely averaged values, or a noise level measured on a
handful of steps, would be noise itself. The rule uses only differences of losses, so it works for
losses near or below zero, where "loss > 4 x best" breaks. A non-finite loss stops the sweep at once.

**Suggestions** (all on the lag-corrected curve, never from the diverged or non-finite region). The *start
level* is the median of the smoothed loss over the warm-up steps, ``D`` the drop from it to the smoothed minimum,
and the *valley floor* the stretch where the smoothed loss is within ``FLOOR_LEVEL`` (30 %) of ``D`` above the
minimum:

- ``valley`` (the default): the geometric centre of the valley floor, divided by 10. A noisy, flat bottom moves
  the arg-minimum by half a decade from one sweep to the next; the centre of the floor barely moves.
- ``minimum``: the LR of the smoothed minimum divided by 10 (the classic rule).
- ``steepest``: the LR where the smoothed loss falls fastest per decade of LR, searched in the descent that
  leads to the floor.
- ``divergence``: the LR where the divergence rule fired (or the first non-finite loss); ``None`` if the sweep
  reached ``max_lr`` without diverging. An upper bound, not a training LR.

The recommended constant LR is the ``valley`` suggestion; the recommended peak of a warmup-cosine or one-cycle
schedule is :data:`PEAK_OVER_CONSTANT` (``10 ** 0.75``, about 5.6) times higher, just below the floor's centre:
a schedule spends most of its steps well below its peak. Both rules and the ratio were chosen, and are checked,
by the benchmark in ``bench/lr_finder.py`` (see ``docs/lr-finder.md``).

**Constant-LR probes** (optional: ``find_lr(probe_steps=N)``, on by default for ``--schedule constant`` and
``find-lr``). The best constant LR for a fixed budget sits anywhere from 0.4 to 10 times the ``valley``
suggestion depending on the optimizer and the task, and no single landmark of one sweep predicts it. So
:meth:`LRFinderResult.probe_lrs` lists ``valley x`` :data:`PROBE_FACTORS` (1, 2, 4, 8; kept below the divergence
point / 2 and ``max_lr``), each is trained for ``N`` steps at that constant LR from the starting weights, and
:meth:`LRFinderResult.with_probes` scores each by its mean loss over the last half of its steps and recommends
the minimum of the parabola (in log LR) through the lowest probe and its two neighbours, which lies between
them; at the end of the row, the lowest probe itself. The schedule peak stays ``valley x PEAK_OVER_CONSTANT``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from birdnet_stm32.errors import UserError
from birdnet_stm32.utils import atomic_path, atomic_write_text

#: Names of the suggestion rules, in the order they are reported.
SUGGESTION_RULES = ("valley", "minimum", "steepest", "divergence")
#: Schedules :meth:`LRFinderResult.lr_for_schedule` knows, and which recommendation each one gets.
SCHEDULE_LR = {"constant": "recommended_lr", "cosine": "recommended_peak_lr", "onecycle": "recommended_peak_lr"}
#: Diverged when the smoothed loss climbs back this fraction of its drop (see the module docstring).
DIVERGENCE_RISE = 0.5
#: Noise margin of the divergence rule, in units of the smoothed noise ``sigma / sqrt(span)``: on a flat stretch
#: of 200 steps (span 5), Gaussian noise alone crosses 6 units in 1 sweep in 5, 8 units in 1 in 140, 12 never
#: in 1000 simulated sweeps.
NOISE_K = 12.0
#: A drop of the smoothed loss smaller than this many smoothed-noise units means the loss never fell (pure
#: Gaussian noise reaches 6 units in fewer than 1 sweep in 100).
FALL_K = 6.0
#: Fewer finite points than this and the sweep cannot be read.
MIN_POINTS = 8
#: Diverging within this fraction of the planned steps means the range starts too high.
EARLY_FRACTION = 0.1
#: The valley floor: where the smoothed loss is within this fraction of its drop above the minimum.
FLOOR_LEVEL = 0.3
#: The edge of the descent that leads to the floor: the loss has fallen this fraction of its drop.
DESCENT_EDGE = 0.1
#: ``valley`` and ``minimum`` are their LR divided by this (one decade below the bottom of the curve).
BELOW_BOTTOM = 10.0
#: A floor reaching the last this-fraction of the planned steps (without divergence) may continue past max_lr.
LATE_FRACTION = 0.05
#: Ratio of the recommended schedule peak LR to the recommended constant LR (measured, see docs/lr-finder.md).
PEAK_OVER_CONSTANT = 10**0.75
#: Multiples of the ``valley`` suggestion tried by the constant-LR probes.
PROBE_FACTORS = (1.0, 2.0, 4.0, 8.0)
#: Probes stay below the divergence point divided by this.
PROBE_BELOW_DIVERGENCE = 2.0
#: Stop reasons a sweep can report.
STOP_REASONS = ("completed", "diverged", "non_finite", "loss_scale_stall", "ended_early")


class LRFinderError(UserError):
    """An LR range test that cannot give an answer: invalid arguments or a bad sweep.

    The message names the argument or says what went wrong and which range to try next.

    Examples:
        >>> check_sweep_args(1e-3, 1e-4, 200)
        Traceback (most recent call last):
        ...
        birdnet_stm32.training.lr_analysis.LRFinderError: LR finder: min_lr (--min-lr) = 0.001 must be below \
max_lr (--max-lr) = 0.0001; try min_lr=1e-07, max_lr=1
    """


def check_sweep_args(min_lr: float, max_lr: float, num_steps: int, smoothing: int = 5, probe_steps: int = 0) -> None:
    """Validate the range, length and smoothing of a sweep, and the length of its constant-LR probes.

    Args:
        min_lr: First learning rate; must be finite and > 0.
        max_lr: Last learning rate; must be finite and > ``min_lr``.
        num_steps: Number of optimizer steps; must be an integer >= 10.
        smoothing: EMA span in steps; must be an integer >= 1 and below ``num_steps``.
        probe_steps: Steps of each constant-LR probe; must be ``0`` (no probes) or an integer >= 4.

    Raises:
        LRFinderError: An argument is invalid; the message names it and suggests a value.

    Examples:
        >>> check_sweep_args(1e-7, 1.0, 200)
        >>> check_sweep_args(0.0, 1.0, 200)
        Traceback (most recent call last):
        ...
        birdnet_stm32.training.lr_analysis.LRFinderError: LR finder: min_lr (--min-lr) = 0 must be a finite \
number > 0; try min_lr=1e-07
    """
    if not (isinstance(min_lr, (int, float)) and math.isfinite(min_lr) and min_lr > 0):
        raise LRFinderError(f"LR finder: min_lr (--min-lr) = {min_lr:g} must be a finite number > 0; try min_lr=1e-07")
    if not (isinstance(max_lr, (int, float)) and math.isfinite(max_lr) and max_lr > 0):
        raise LRFinderError(f"LR finder: max_lr (--max-lr) = {max_lr:g} must be a finite number > 0; try max_lr=1")
    if min_lr >= max_lr:
        raise LRFinderError(
            f"LR finder: min_lr (--min-lr) = {min_lr:g} must be below max_lr (--max-lr) = {max_lr:g}; "
            "try min_lr=1e-07, max_lr=1"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 10:
        raise LRFinderError(f"LR finder: num_steps (--num-steps) = {num_steps} must be an integer >= 10; try 200")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, np.integer)) or not 1 <= smoothing < num_steps:
        raise LRFinderError(
            f"LR finder: smoothing = {smoothing} must be an integer from 1 to num_steps - 1 ({num_steps - 1}); try 5"
        )
    if (
        isinstance(probe_steps, bool)
        or not isinstance(probe_steps, (int, np.integer))
        or not (probe_steps == 0 or probe_steps >= 4)
    ):
        raise LRFinderError(
            f"LR finder: probe_steps (--probe-steps) = {probe_steps} must be 0 (no probes) or an integer >= 4; try 100"
        )


def sweep_lrs(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
    """Learning rates of an exponential sweep: ``min_lr * (max_lr / min_lr) ** (i / (num_steps - 1))``.

    Args:
        min_lr: First learning rate (> 0).
        max_lr: Last learning rate (> ``min_lr``).
        num_steps: Number of steps (>= 10).

    Returns:
        Array of ``num_steps`` learning rates, geometrically spaced from ``min_lr`` to ``max_lr``.

    Raises:
        LRFinderError: Invalid arguments (see :func:`check_sweep_args`).

    Examples:
        >>> [f"{lr:.0e}" for lr in sweep_lrs(1e-4, 1e-1, 10)[[0, 3, 9]]]
        ['1e-04', '1e-03', '1e-01']
    """
    check_sweep_args(min_lr, max_lr, num_steps)
    return min_lr * (max_lr / min_lr) ** (np.arange(num_steps) / (num_steps - 1))


def ema(values: Sequence[float] | np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """Bias-corrected exponential moving average and its lag.

    ``s[t] = sum_k beta**k * x[t - k] / sum_k beta**k`` over ``k = 0..t`` with ``beta = 1 - 2 / (span + 1)``.

    Args:
        values: The series, in step order (finite values).
        span: EMA span in steps (>= 1); ``1`` returns the series unchanged.

    Returns:
        ``(smoothed, lag)``: the smoothed series and, for every step, how many steps back the centre of its
        weights lies (0 at the first step, about ``(span - 1) / 2`` later on).

    Examples:
        >>> s, lag = ema([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], span=3)
        >>> bool(np.allclose(s, np.arange(6) - lag))
        True
    """
    x = np.asarray(values, dtype=np.float64)
    beta = 1.0 - 2.0 / (span + 1.0)
    smoothed = np.empty_like(x)
    lag = np.empty_like(x)
    num = den = acc = 0.0
    for t, value in enumerate(x):
        num = beta * (num + den)
        den = beta * den + 1.0
        acc = beta * acc + value
        smoothed[t] = acc / den
        lag[t] = num / den
    return smoothed, lag


def noise_sigma(values: Sequence[float] | np.ndarray) -> float:
    """Robust per-step noise of a loss series.

    The median absolute deviation of the first differences, scaled to a standard deviation (x 1.4826) and divided
    by ``sqrt(2)`` (a difference holds two noise terms). A smooth trend barely moves the differences and a few
    spikes do not move the median.

    Args:
        values: The series (finite values).

    Returns:
        The noise standard deviation in loss units; 0 for fewer than 3 values.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = np.linspace(3, 1, 2000) + rng.normal(0, 0.1, 2000)
        >>> round(noise_sigma(x), 2)
        0.1
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < 3:
        return 0.0
    d = np.diff(x)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


class DivergenceMonitor:
    """Online smoothing and divergence rule for a running sweep (see the module docstring for the rule).

    Feed it one loss per optimizer step; it keeps the bias-corrected EMA and says when to stop.

    Args:
        span: EMA span in steps.
        rise: Fraction of the drop the smoothed loss must climb back (:data:`DIVERGENCE_RISE`).
        noise_k: Noise margin in smoothed-noise units (:data:`NOISE_K`).

    Examples:
        >>> monitor = DivergenceMonitor(span=5)
        >>> losses = [2.0] * 10 + list(np.linspace(2.0, 0.5, 30)) + [0.5 * 1.5**k for k in range(1, 20)]
        >>> next(i for i, loss in enumerate(losses) if monitor.update(loss))
        43
        >>> DivergenceMonitor(span=5).update(float("nan"))
        'non_finite'
    """

    def __init__(self, span: int, rise: float = DIVERGENCE_RISE, noise_k: float = NOISE_K):
        self.span = span
        self.rise = rise
        self.noise_k = noise_k
        self.smoothed: list[float] = []
        self._losses: list[float] = []
        self._beta = 1.0 - 2.0 / (span + 1.0)
        self._acc = 0.0
        self._den = 0.0
        self._top = -math.inf
        self._best = math.inf
        self._drop = 0.0
        self._warmup = max(span, 10)

    def update(self, loss: float) -> str | None:
        """Add the loss of the next step.

        Args:
            loss: The true (not averaged) loss of this optimizer step.

        Returns:
            ``"non_finite"`` if the loss is NaN or infinite, ``"diverged"`` if the divergence rule fires at this
            step, else ``None``.
        """
        if not math.isfinite(loss):
            return "non_finite"
        self._losses.append(loss)
        self._acc = self._beta * self._acc + loss
        self._den = self._beta * self._den + 1.0
        s = self._acc / self._den
        self.smoothed.append(s)
        if len(self._losses) < self._warmup:
            return None
        self._top = max(self._top, s)
        if s < self._best:
            self._best = s
            self._drop = self._top - s
        rise = s - self._best
        resolution = 1e-6 * abs(s)  # float32 rounding: a noise-free loss must not "diverge" by one ulp
        if rise <= max(self.rise * self._drop, resolution):
            return None  # decided without estimating the noise (the costly part)
        margin = self.noise_k * noise_sigma(self._losses) / math.sqrt(self.span)
        return "diverged" if rise > margin else None


def probe_scores(runs: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Score of each constant-LR probe: the mean loss over the last half of its steps, and its standard error.

    Args:
        runs: For each probe, the true loss of every step, in order (at least 2 steps).

    Returns:
        ``(scores, stderr)``: ``inf`` for a run with a non-finite loss (it diverged); the standard error is the
        per-step noise (:func:`noise_sigma`) of the last half over the square root of its length.

    Raises:
        ValueError: A run has fewer than 2 steps.

    Examples:
        >>> scores, stderr = probe_scores([[3.0, 2.0, 1.0, 1.0], [3.0, float("nan"), 9.0, 9.0]])
        >>> scores.tolist(), stderr.tolist()
        ([1.0, inf], [0.0, inf])
    """
    scores, stderr = [], []
    for run in runs:
        x = np.asarray(run, dtype=np.float64)
        if x.size < 2:
            raise ValueError(f"probe_scores: a probe run needs at least 2 steps, got {x.size}")
        tail = x[x.size // 2 :]
        finite = bool(np.isfinite(x).all())
        scores.append(float(tail.mean()) if finite else math.inf)
        stderr.append(noise_sigma(tail) / math.sqrt(tail.size) if finite else math.inf)
    return np.array(scores), np.array(stderr)


def _log_interp(position: np.ndarray | float, lrs: np.ndarray) -> np.ndarray:
    """LR at fractional step ``position``, interpolated in log space."""
    return 10.0 ** np.interp(position, np.arange(lrs.size), np.log10(lrs))


@dataclass
class LRFinderResult:
    """Everything an LR range test found: the curve, every rule's suggestion, the verdict and its metadata.

    Build it with :meth:`from_sweep` (or get it from :func:`~birdnet_stm32.training.lr_finder.find_lr`).

    Args:
        lrs: Learning rate of every recorded optimizer step (the value the optimizer really used).
        losses: True loss of every recorded step (the batch's own loss, not a running mean); the last value may
            be non-finite when that stopped the sweep.
        smoothed: Bias-corrected EMA of ``losses`` over the finite steps.
        smoothed_lrs: Lag-corrected learning rate at which each ``smoothed`` value is read.
        suggestions: LR of every rule in :data:`SUGGESTION_RULES` (``None`` where a rule does not apply).
        recommended_lr: Recommended constant learning rate (``None`` for a bad sweep).
        recommended_peak_lr: Recommended peak of a warmup-cosine or one-cycle schedule (``None`` for a bad sweep).
        valley_floor: Lowest and highest lag-corrected LR of the valley floor (``None`` if the loss never fell).
        stop_reason: Why the sweep stopped, one of :data:`STOP_REASONS`.
        stop_step: Index of the step where it stopped, ``None`` if it completed.
        ok: ``True`` when the sweep can be trusted; otherwise ``error`` says why.
        error: What went wrong and which range to try (``None`` when ``ok``).
        warnings: Conditions worth knowing that do not invalidate the result.
        metadata: Sweep settings and context (range, steps, smoothing, optimizer, batch size, seed, versions,
            wall time, ...), written into ``lr_finder.json``.
        probes: The constant-LR probes, if any were run (:meth:`with_probes`): ``{"steps", "lrs", "losses",
            "stderr", "runs", "picked"}``, the losses being each probe's score (:func:`probe_scores`) and the
            runs its per-step losses.

    Examples:
        >>> lrs = sweep_lrs(1e-6, 1.0, 120)
        >>> x = np.log10(lrs)
        >>> losses = 2.3 - 2.0 / (1 + np.exp(-3 * (x + 3.5))) + np.where(x > -1.5, 10 * (x + 1.5) ** 2, 0)
        >>> result = LRFinderResult.from_sweep(lrs, losses, smoothing=5, num_steps=120)
        >>> result.ok, result.stop_reason
        (True, 'diverged')
        >>> 1e-4 < result.recommended_lr < result.recommended_peak_lr < result.suggestions["divergence"]
        True
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    smoothed_lrs: np.ndarray
    suggestions: dict[str, float | None]
    recommended_lr: float | None
    recommended_peak_lr: float | None
    valley_floor: tuple[float, float] | None
    stop_reason: str
    stop_step: int | None
    ok: bool
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, Any] | None = None

    @classmethod
    def from_sweep(
        cls,
        lrs: Sequence[float] | np.ndarray,
        losses: Sequence[float] | np.ndarray,
        *,
        smoothing: int = 5,
        num_steps: int | None = None,
        stop_reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LRFinderResult:
        """Analyse a recorded sweep: smooth, find the stop point, apply every rule and judge the sweep.

        The divergence rule is replayed over ``losses``, so the stop point is the same whether the sweep was
        stopped online or recorded in full.

        Args:
            lrs: Learning rate of every step, increasing.
            losses: True loss of every step (same length as ``lrs``).
            smoothing: EMA span in steps (>= 1).
            num_steps: Planned number of steps (default ``len(lrs)``); used to spot a sweep that diverged too
                early or ended early.
            stop_reason: Why the recording ended when the losses alone cannot tell (``"loss_scale_stall"`` or
                ``"ended_early"``); ignored if the losses show divergence or a non-finite value first.
            metadata: Extra context to keep with the result (written to ``lr_finder.json``).

        Returns:
            The analysed result; ``ok`` is ``False`` (with ``error`` set and recommendations ``None``) when the
            sweep cannot be trusted.

        Raises:
            ValueError: ``lrs`` and ``losses`` differ in length or ``lrs`` is not positive and increasing.
        """
        lrs = np.asarray(lrs, dtype=np.float64)
        losses = np.asarray(losses, dtype=np.float64)
        if lrs.shape != losses.shape or lrs.ndim != 1:
            raise ValueError(f"lrs and losses must be 1-D and of equal length, got {lrs.shape} and {losses.shape}")
        if lrs.size and (np.any(lrs <= 0) or np.any(np.diff(lrs) < 0)):
            raise ValueError("lrs must be positive and non-decreasing")
        planned = int(num_steps or lrs.size)

        monitor = DivergenceMonitor(smoothing)
        stop, reason = None, None
        for i, loss in enumerate(losses):
            reason = monitor.update(float(loss))
            if reason:
                stop = i
                break
        if stop is None:
            reason = stop_reason if stop_reason in ("loss_scale_stall", "ended_early") else "completed"
            if lrs.size < planned and reason == "completed":
                reason = "ended_early"
        n_finite = stop if reason == "non_finite" else (stop + 1 if stop is not None else lrs.size)
        smoothed, lag = ema(losses[:n_finite], smoothing)
        smoothed_lrs = _log_interp(np.arange(n_finite) - lag, lrs) if n_finite else np.empty(0)

        rules = _apply_rules(smoothed, smoothed_lrs, lrs, stop, reason, smoothing)
        error, warnings = _judge(rules, lrs, losses, n_finite, stop, reason, planned, smoothing)
        suggestions = {name: rules.get(name) for name in SUGGESTION_RULES}
        ok = error is None
        meta = {"min_lr": float(lrs[0]) if lrs.size else None, "max_lr": float(lrs[-1]) if lrs.size else None}
        meta.update({"num_steps": planned, "recorded_steps": int(lrs.size), "smoothing": smoothing})
        meta.update(metadata or {})
        return cls(
            lrs=lrs,
            losses=losses,
            smoothed=smoothed,
            smoothed_lrs=smoothed_lrs,
            suggestions=suggestions,
            recommended_lr=suggestions["valley"] if ok else None,
            recommended_peak_lr=suggestions["valley"] * PEAK_OVER_CONSTANT if ok else None,
            valley_floor=rules.get("valley_floor"),
            stop_reason=reason,
            stop_step=stop if stop is not None else (None if reason == "completed" else int(lrs.size)),
            ok=ok,
            error=error,
            warnings=warnings,
            metadata=meta,
        )

    def raise_for_status(self) -> None:
        """Raise if the sweep cannot be trusted.

        Raises:
            LRFinderError: ``ok`` is ``False``; the message says what went wrong and which range to try.
        """
        if not self.ok:
            raise LRFinderError(self.error)

    def probe_lrs(self) -> list[float]:
        """The learning rates the constant-LR probes try: ``valley x`` :data:`PROBE_FACTORS`.

        Multiples above the divergence point / :data:`PROBE_BELOW_DIVERGENCE` or above the sweep's ``max_lr``
        are left out; the ``valley`` suggestion itself always stays.

        Returns:
            The LRs in increasing order (empty for a bad sweep).

        Examples:
            >>> lrs = sweep_lrs(1e-6, 1.0, 120)
            >>> losses = 2.3 - 2.0 / (1 + np.exp(-3 * (np.log10(lrs) + 3.5)))
            >>> result = LRFinderResult.from_sweep(lrs, losses)
            >>> [round(lr / result.suggestions["valley"]) for lr in result.probe_lrs()]
            [1, 2, 4, 8]
        """
        if not self.ok:
            return []
        valley, top = self.suggestions["valley"], float(self.lrs[-1])
        if self.suggestions["divergence"] is not None:
            top = min(top, self.suggestions["divergence"] / PROBE_BELOW_DIVERGENCE)
        return [valley * f for f in PROBE_FACTORS if f == 1.0 or valley * f <= top]

    def with_probes(self, lrs: Sequence[float], runs: Sequence[Sequence[float]]) -> LRFinderResult:
        """The result with the constant LR chosen by probes: the minimum of the probes' loss curve.

        Each probe is scored by the mean of its losses over the last half of its steps (``inf`` if any of them
        is not finite: it diverged). The minimum is that of the parabola in ``log10(lr)`` through the probe with
        the lowest score and its two neighbours (kept between the neighbours); when the lowest probe is the
        first or the last, or a neighbour diverged, it is that probe's LR. Interpolating instead of taking the
        lowest probe moves the pick less from one sweep to the next, and not past a neighbour that was nearly as
        good.

        Args:
            lrs: The probed learning rates (from :meth:`probe_lrs`).
            runs: For each probe, the true loss of every step, in order.

        Returns:
            A copy with ``recommended_lr`` set to the minimum and ``probes`` filled in (``steps``, ``lrs``,
            ``losses``: the scores, ``stderr``: their standard errors, ``runs``: the per-step losses, ``picked``);
            the recommendation is unchanged if every probe diverged (a warning says so).

        Raises:
            ValueError: ``lrs`` and ``runs`` differ in length or are empty, or a run has fewer than 2 steps.

        Examples:
            >>> lrs = sweep_lrs(1e-6, 1.0, 120)
            >>> result = LRFinderResult.from_sweep(lrs, 2.3 - 2.0 / (1 + np.exp(-3 * (np.log10(lrs) + 3.5))))
            >>> runs = [np.full(50, v) for v in (0.9, 0.7, 0.8, float("nan"))]
            >>> probed = result.with_probes(result.probe_lrs(), runs)
            >>> round(probed.recommended_lr / result.suggestions["valley"], 2)  # between x1 and x4, nearer x2
            2.24
        """
        if len(lrs) != len(runs) or not len(lrs):
            raise ValueError(f"with_probes: need as many runs as LRs (>= 1), got {len(lrs)} and {len(runs)}")
        scores, stderr = probe_scores(runs)
        probes = {  # non-finite values as None: lr_finder.json stays standard JSON
            "steps": max(len(r) for r in runs),
            "lrs": [float(v) for v in lrs],
            "losses": _finite_or_none(scores),
            "stderr": _finite_or_none(stderr),
            "runs": [_finite_or_none(r) for r in runs],
        }
        if not np.isfinite(scores).any():
            note = "every constant-LR probe diverged; the recommended constant LR is the valley suggestion"
            return dataclasses.replace(self, probes={**probes, "picked": None}, warnings=[*self.warnings, note])
        picked = _parabola_minimum(np.asarray(lrs, dtype=float), scores)
        return dataclasses.replace(self, recommended_lr=picked, probes={**probes, "picked": picked})

    def lr_for_schedule(self, schedule: str) -> float:
        """The learning rate to use for a schedule.

        ``"constant"`` gets :attr:`recommended_lr`; ``"cosine"`` (warmup + cosine) and ``"onecycle"`` get
        :attr:`recommended_peak_lr`, their peak. A schedule spends most steps below its peak, so its best peak
        is higher than the best constant LR (measured in ``docs/lr-finder.md``).

        Args:
            schedule: ``"constant"``, ``"cosine"`` or ``"onecycle"``.

        Returns:
            The learning rate (the peak for ``cosine`` and ``onecycle``).

        Raises:
            LRFinderError: Unknown schedule, or a bad sweep (see :meth:`raise_for_status`).

        Examples:
            >>> lrs = sweep_lrs(1e-6, 1.0, 120)
            >>> losses = 2.3 - 2.0 / (1 + np.exp(-3 * (np.log10(lrs) + 3.5)))
            >>> result = LRFinderResult.from_sweep(lrs, losses)
            >>> result.lr_for_schedule("cosine") == result.recommended_peak_lr
            True
        """
        if schedule not in SCHEDULE_LR:
            raise LRFinderError(f"LR finder: unknown schedule {schedule!r}; choose {', '.join(SCHEDULE_LR)}")
        self.raise_for_status()
        return float(getattr(self, SCHEDULE_LR[schedule]))

    def to_dict(self) -> dict[str, Any]:
        """Everything except the per-step arrays, as JSON-ready values (the content of ``lr_finder.json``).

        Returns:
            A dict with the suggestions, recommendations, verdict, warnings and metadata.
        """
        return {
            "ok": self.ok,
            "error": self.error,
            "recommended_lr": self.recommended_lr,
            "recommended_peak_lr": self.recommended_peak_lr,
            "peak_over_constant": PEAK_OVER_CONSTANT,
            "suggestions": dict(self.suggestions),
            "valley_floor": list(self.valley_floor) if self.valley_floor else None,
            "stop_reason": self.stop_reason,
            "stop_step": self.stop_step,
            "stop_lr": self._stop_lr(),
            "warnings": list(self.warnings),
            "probes": self.probes,
            "rules": {
                "smoothing": "bias-corrected EMA, read at the lag-corrected LR",
                "divergence_rise": DIVERGENCE_RISE,
                "noise_k": NOISE_K,
                "fall_k": FALL_K,
                "floor_level": FLOOR_LEVEL,
                "below_bottom": BELOW_BOTTOM,
            },
            **{k: v for k, v in self.metadata.items() if k not in ("ok", "error")},
        }

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``lr_finder.csv``, ``lr_finder.json`` and ``lr_finder.png`` into ``out_dir`` (atomically).

        The CSV has one row per recorded step: ``step, lr, loss, smoothed_loss, smoothed_lr`` (the smoothed
        columns are empty after the stop point). The JSON holds :meth:`to_dict`.

        Args:
            out_dir: Destination folder (created if needed).

        Returns:
            ``{"csv": path, "json": path, "png": path}``.
        """
        out_dir = Path(out_dir)
        paths = {"csv": out_dir / "lr_finder.csv", "json": out_dir / "lr_finder.json", "png": out_dir / "lr_finder.png"}
        with atomic_path(paths["csv"]) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "lr", "loss", "smoothed_loss", "smoothed_lr"])
            for i, (lr, loss) in enumerate(zip(self.lrs, self.losses, strict=True)):
                smooth = (
                    (f"{self.smoothed[i]:.8g}", f"{self.smoothed_lrs[i]:.8g}") if i < self.smoothed.size else ("", "")
                )
                writer.writerow([i, f"{lr:.8g}", f"{loss:.8g}", *smooth])
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")
        self.plot(paths["png"])
        return paths

    def summary(self) -> str:
        """A short human-readable report: how the sweep ended, every suggestion and what to use.

        Returns:
            A few lines of text (printed by ``birdnet-stm32 find-lr``).
        """
        meta = self.metadata
        lines = [
            f"LR range test: {meta.get('recorded_steps', self.lrs.size)} of {meta.get('num_steps')} steps, "
            f"lr {meta.get('min_lr', 0):.1e} -> {meta.get('max_lr', 0):.1e}, stopped: {self._stop_text()}"
        ]
        notes = {
            "valley": "centre of the valley floor / 10",
            "minimum": "loss minimum / 10",
            "steepest": "fastest fall per decade",
            "divergence": "loss blows up here (upper bound)",
        }
        for name in SUGGESTION_RULES:
            lr = self.suggestions.get(name)
            lines.append(f"  {name:<11} {_fmt(lr):>9}   {notes[name]}")
        if self.probes:
            p = self.probes
            rows = zip(p["lrs"], p["losses"], p["stderr"], strict=True)
            tried = (
                f"{_fmt(lr)}: " + ("diverged" if loss is None else f"{loss:.4g} +- {se:.2g}") for lr, loss, se in rows
            )
            lines.append(f"  constant-LR probes ({p['steps']} steps; mean loss of the last half +- standard error):")
            lines.append("    " + ", ".join(tried))
        if self.ok:
            lines.append(f"  recommended constant LR      {_fmt(self.recommended_lr)}   (--schedule constant)")
            lines.append(
                f"  recommended schedule peak LR {_fmt(self.recommended_peak_lr)}   (--schedule cosine|onecycle)"
            )
        else:
            lines.append(f"  BAD SWEEP: {self.error}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, suggested_lr: float | None = None) -> None:
        """Plot loss against learning rate with every suggestion and the stop point marked.

        Raw per-step losses are drawn faintly, the smoothed curve at its lag-corrected LR boldly; each rule's
        LR is a vertical line, the recommendations are marked on the curve, the constant-LR probes (if any) are
        squares at their loss, and the region past the stop point is shaded. The LR axis is logarithmic; the
        loss axis is clipped so the blow-up does not hide the valley.

        Args:
            path: Save the figure here (PNG, atomically); ``None`` shows it (interactive use).
            suggested_lr: An extra LR to mark (for example a value you are considering).
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5))
        finite = np.isfinite(self.losses)
        ax.plot(self.lrs[finite], self.losses[finite], color="0.7", lw=0.8, marker=".", ms=3, label="loss per step")
        if self.smoothed.size:
            ax.plot(self.smoothed_lrs, self.smoothed, color="tab:blue", lw=2.2, label="smoothed (lag-corrected)")
        styles = {
            "valley": ("tab:green", "-"),
            "minimum": ("tab:orange", "--"),
            "steepest": ("tab:purple", ":"),
            "divergence": ("tab:red", "-."),
        }
        for name in SUGGESTION_RULES:
            lr = self.suggestions.get(name)
            if lr is not None:
                color, ls = styles[name]
                ax.axvline(lr, color=color, ls=ls, lw=1.5, label=f"{name}: {lr:.2g}")
        if suggested_lr is not None:
            ax.axvline(suggested_lr, color="black", ls="--", lw=1.2, label=f"suggested: {suggested_lr:.2g}")
        for lr, marker, text in ((self.recommended_lr, "o", "constant"), (self.recommended_peak_lr, "^", "peak")):
            if lr is not None and self.smoothed.size:
                y = float(np.interp(np.log10(lr), np.log10(self.smoothed_lrs), self.smoothed))
                ax.plot([lr], [y], marker=marker, color="black", ms=9, ls="none", label=f"recommended {text}: {lr:.2g}")
        probe_lrs, probe_losses = self._probe_points()
        if probe_lrs.size:
            ax.plot(probe_lrs, probe_losses, color="tab:brown", marker="s", ms=6, ls="--", lw=1,
                    label=f"constant-LR probes ({self.probes['steps']} steps)")  # fmt: skip
        if self.valley_floor is not None:
            ax.axvspan(*self.valley_floor, color="tab:green", alpha=0.12, label="valley floor")
        stop_lr = self._stop_lr()
        if stop_lr is not None:
            ax.axvspan(stop_lr, self.lrs[-1] * 1.5, color="tab:red", alpha=0.08)
            ax.annotate(f"stopped: {self.stop_reason}", xy=(stop_lr, 0.97), xycoords=("data", "axes fraction"),
                        ha="right", va="top", color="tab:red", fontsize=9)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlim(self.lrs[0] / 1.5 if self.lrs.size else None, self.lrs[-1] * 1.5 if self.lrs.size else None)
        if self.smoothed.size:
            low, high = float(np.min(self.smoothed)), float(np.max(self.smoothed[: int(np.argmin(self.smoothed)) + 1]))
            low = min(low, float(np.min(probe_losses))) if probe_losses.size else low
            pad = max(high - low, 1e-3 * max(abs(high), 1.0))
            ax.set_ylim(low - 0.15 * pad, high + 0.35 * pad)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        verdict = "ok" if self.ok else "BAD SWEEP"
        ax.set_title(f"LR range test ({verdict}, stopped: {self.stop_reason})", color="black" if self.ok else "tab:red")
        if not self.ok:
            ax.text(0.02, 0.03, _wrap(self.error or "", 110), transform=ax.transAxes, fontsize=8, color="tab:red")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
        fig.tight_layout()
        if path is None:
            plt.show()
            return
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)

    def _probe_points(self) -> tuple[np.ndarray, np.ndarray]:
        """LRs and losses of the probes with a finite loss (empty without probes)."""
        if not self.probes:
            return np.empty(0), np.empty(0)
        lrs, losses = np.array(self.probes["lrs"], float), np.array(self.probes["losses"], float)
        return lrs[np.isfinite(losses)], losses[np.isfinite(losses)]

    def _stop_lr(self) -> float | None:
        if self.stop_reason == "completed" or self.stop_step is None or not self.lrs.size:
            return None
        if self.stop_reason == "diverged" and self.suggestions.get("divergence") is not None:
            return self.suggestions["divergence"]
        return float(self.lrs[min(self.stop_step, self.lrs.size - 1)])

    def _stop_text(self) -> str:
        if self.stop_reason == "completed":
            return "reached max_lr"
        return f"{self.stop_reason} at step {self.stop_step} (lr {_fmt(self._stop_lr())})"


def _apply_rules(
    smoothed: np.ndarray,
    smoothed_lrs: np.ndarray,
    lrs: np.ndarray,
    stop: int | None,
    reason: str,
    span: int,
) -> dict[str, Any]:
    """Every rule's LR plus the landmarks the verdict and the plot need (all on the lag-corrected curve)."""
    out: dict[str, Any] = dict.fromkeys(SUGGESTION_RULES)
    if reason == "diverged" and smoothed_lrs.size:
        out["divergence"] = float(smoothed_lrs[-1])
    elif reason == "non_finite" and stop is not None:
        out["divergence"] = float(lrs[stop])
    if smoothed.size < 2:
        return out
    x = np.log10(smoothed_lrs)
    i_min = int(np.argmin(smoothed))
    bottom = float(smoothed[i_min])
    start_level = float(np.median(smoothed[: max(span, 10)]))
    drop = start_level - bottom
    out.update(i_min=i_min, drop=drop)
    out["minimum"] = float(10 ** x[i_min] / BELOW_BOTTOM)
    if drop <= 0:
        return out
    floor = np.nonzero(smoothed <= bottom + FLOOR_LEVEL * drop)[0]
    first, last = int(floor[0]), int(floor[-1])
    out.update(floor_first=first, floor_last=last, valley_floor=(float(10 ** x[first]), float(10 ** x[last])))
    out["valley"] = float(10 ** ((x[first] + x[last]) / 2) / BELOW_BOTTOM)
    above = np.nonzero(smoothed[: first + 1] >= start_level - DESCENT_EDGE * drop)[0]
    descent = slice(int(above[-1]) if above.size else 0, first + 1)
    if descent.stop - descent.start >= 3:
        slope = np.gradient(smoothed[descent], x[descent])
        out["steepest"] = float(10 ** x[descent.start + int(np.argmin(slope))])
    out["descent_start"] = descent.start
    return out


def _judge(
    rules: dict[str, Any],
    lrs: np.ndarray,
    losses: np.ndarray,
    n_finite: int,
    stop: int | None,
    reason: str,
    planned: int,
    span: int,
) -> tuple[str | None, list[str]]:
    """Decide whether the sweep can be trusted: ``(error or None, warnings)``."""
    warnings: list[str] = []
    first, last = (float(lrs[0]), float(lrs[-1])) if lrs.size else (0.0, 0.0)
    stop_lr = rules.get("divergence")
    if reason == "ended_early":
        warnings.append(f"the sweep ended after {lrs.size} of {planned} steps (the data ran out?)")
    if reason == "loss_scale_stall":
        warnings.append(
            "mixed precision: the loss scale kept skipping steps; the sweep stopped at the last applied step"
        )
    if n_finite < MIN_POINTS:
        if stop_lr is None:
            return (
                f"only {n_finite} steps were recorded, need at least {MIN_POINTS}: give the sweep more data "
                "(or a repeating dataset)",
                warnings,
            )
        return (
            f"only {n_finite} finite steps before the loss {_reason_text(reason)} at lr {_fmt(stop_lr)}, need at "
            f"least {MIN_POINTS}: the range is too high; try min_lr={stop_lr / 1e5:.0e}, max_lr={stop_lr:.0e}",
            warnings,
        )
    if reason in ("diverged", "non_finite") and stop is not None and stop < EARLY_FRACTION * planned:
        return (
            f"the loss {_reason_text(reason)} at lr {_fmt(stop_lr)}, within the first {EARLY_FRACTION:.0%} of the "
            f"sweep: the range is too high; try min_lr={stop_lr / 1e5:.0e}, max_lr={stop_lr:.0e}",
            warnings,
        )
    sigma = noise_sigma(losses[:n_finite]) / math.sqrt(span)
    if rules.get("valley") is None or rules.get("drop", 0.0) <= FALL_K * sigma:
        if reason in ("diverged", "non_finite"):
            return (
                f"the loss never fell before it {_reason_text(reason)} at lr {_fmt(stop_lr)}: try a lower range "
                f"(min_lr={stop_lr / 1e5:.0e}, max_lr={stop_lr:.0e}) or check the labels and the loss",
                warnings,
            )
        return (
            f"the loss never fell between {_fmt(first)} and {_fmt(last)}: the range is too low; try "
            f"min_lr={first:.0e}, max_lr={last * 1e3:.0e}",
            warnings,
        )
    if reason == "completed" and rules["floor_last"] >= n_finite - max(LATE_FRACTION * planned, 1):
        warnings.append(
            f"the valley floor reaches max_lr={_fmt(last)} (the loss had not clearly risen again): the "
            f"suggestions may be too low; try max_lr={last * 100:.0e} to see where it diverges"
        )
    if rules.get("descent_start") == 0:
        warnings.append(f"the loss was already falling at min_lr={_fmt(first)}; try min_lr={first / 100:.0e}")
    return None, warnings


def _parabola_minimum(lrs: np.ndarray, scores: np.ndarray) -> float:
    """Minimum of the parabola in log LR through the lowest score and its neighbours (see ``with_probes``)."""
    i = int(np.argmin(scores))
    if i == 0 or i == len(scores) - 1 or not np.isfinite(scores[i - 1 : i + 2]).all():
        return float(lrs[i])
    (x0, x1, x2), (y0, y1, y2) = np.log10(lrs[i - 1 : i + 2]), scores[i - 1 : i + 2]
    # A parabola's secant slope is its derivative at the secant's midpoint, and its derivative is linear: it
    # goes from slope_0 at m0 to slope_1 at m1 and is zero at the vertex.
    slope_0, slope_1 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    if slope_1 <= slope_0:  # not curved upwards (all three equal): nothing to interpolate
        return float(lrs[i])
    m0, m1 = (x0 + x1) / 2, (x1 + x2) / 2
    vertex = m0 - slope_0 * (m1 - m0) / (slope_1 - slope_0)
    return float(10 ** np.clip(vertex, x0, x2))


def _finite_or_none(values: Sequence[float] | np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _reason_text(reason: str) -> str:
    return "became non-finite" if reason == "non_finite" else "diverged"


def _fmt(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:.2e}"


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


__all__ = [
    "BELOW_BOTTOM",
    "DESCENT_EDGE",
    "DIVERGENCE_RISE",
    "DivergenceMonitor",
    "EARLY_FRACTION",
    "FALL_K",
    "FLOOR_LEVEL",
    "LATE_FRACTION",
    "LRFinderError",
    "LRFinderResult",
    "MIN_POINTS",
    "NOISE_K",
    "PEAK_OVER_CONSTANT",
    "PROBE_BELOW_DIVERGENCE",
    "PROBE_FACTORS",
    "SCHEDULE_LR",
    "STOP_REASONS",
    "SUGGESTION_RULES",
    "check_sweep_args",
    "ema",
    "noise_sigma",
    "probe_scores",
    "sweep_lrs",
]
