"""Benchmark of the LR finder: regret against a grid search, stability across seeds, and cost.

For every task the learning rate is grid-searched on a fixed short training budget (4 points per decade, 2
training seeds) for a constant schedule and for the project's warmup + cosine schedule; then the LR range test is
run with several sweep seeds and every rule's suggestion is scored by its *regret*: validation accuracy (and loss)
of the grid's best LR minus that of the suggested LR (read off the grid curve, interpolated in log LR). The
recommended values are also trained for real. The seed implementation's rule (moving average of Keras' running
mean loss, steepest gradient, Adam recompile) is re-implemented here as the baseline.

Tasks (AdamW, weight decay 1e-4, batch 32 — the project's defaults):

- ``digits``: scikit-learn's 8x8 digits, a small CNN (4 epochs).
- ``digits_sgd``: the same with SGD + Nesterov momentum 0.9 (the project's ``--optimizer sgd``).
- ``fsdd``: the Free Spoken Digit Dataset from ``../shared/data/fsdd`` (skipped when absent), log-mel + CNN.
- ``birds``: the project's synthetic bird calls (``birdnet_stm32.data.synthetic``) and its DS-CNN
  (``birdnet_stm32.models``) with a small hybrid frontend.

Cost: the sweep's wall time against one training epoch, and the callback's per-step overhead against a plain
``fit`` of the same model.

Usage::

    python bench/lr_finder.py                 # everything (~30 min on 2 CPU cores)
    python bench/lr_finder.py --quick         # smoke run: digits only, coarse, 2 seeds (~2 min)
    python bench/lr_finder.py --tasks digits,fsdd --json out.json
    python bench/lr_finder.py --tasks birds --plot docs/img/lr_finder.png   # the guide's figure
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
CACHE = Path(tempfile.gettempdir()) / "birdnet_stm32_bench"
RULES = ("valley", "minimum", "steepest")


@dataclass
class Task:
    """A training problem with a fixed budget."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    build: Any  # seed -> uncompiled keras.Model
    epochs: int
    optimizer: str = "adamw"
    batch_size: int = 32
    grid: tuple[float, float] = (-4.5, 0.0)  # log10 LR range of the grid
    notes: str = ""
    init_cache: dict = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.x_train) // self.batch_size


# ----------------------------------------------------------------------------------------------------------- tasks


def small_cnn(input_shape, n_classes, widths=(16, 32), pool=False):
    import keras

    def build(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(input_shape)
        h = inputs
        for w in widths:
            h = keras.layers.Conv2D(w, 3, padding="same", use_bias=False)(h)
            h = keras.layers.BatchNormalization(momentum=0.9)(h)
            h = keras.layers.ReLU()(h)
            if pool:
                h = keras.layers.MaxPooling2D()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dropout(0.1)(h)
        return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(h))

    return build


def digits_task(optimizer="adamw") -> Task:
    import keras
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[..., None] / 16.0).astype("float32")
    y = keras.utils.to_categorical(d.target, 10).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    val, train = order[:360], order[360:]
    grid = (-4.5, 0.0) if optimizer == "adamw" else (-3.5, 1.0)
    return Task(f"digits{'_sgd' if optimizer == 'sgd' else ''}", x[train], y[train], x[val], y[val],
                small_cnn((8, 8, 1), 10), epochs=4, optimizer=optimizer, grid=grid,
                notes=f"sklearn digits 8x8, 1437 train / 360 val, CNN 16-32, {optimizer}, 4 epochs")  # fmt: skip


def fsdd_task() -> Task | None:
    import keras

    if not FSDD.is_dir():
        print(f"[fsdd] {FSDD} not found: task skipped")
        return None
    cache = CACHE / "fsdd_mel.npz"
    if not cache.is_file():
        import librosa
        import soundfile as sf

        xs, labels, index = [], [], []
        files = sorted(FSDD.glob("[0-9]/*.wav"))
        t0 = time.perf_counter()
        for path in files:
            audio, sr = sf.read(path, dtype="float32")
            audio = np.pad(audio, (0, max(0, 4800 - len(audio))))[:4800]
            mel = librosa.feature.melspectrogram(y=audio, sr=sr, n_fft=256, hop_length=150, n_mels=32, fmax=4000)
            xs.append(np.log(mel[:, :32] + 1e-6))
            labels.append(int(path.parent.name))
            index.append(int(path.stem.split("_")[-1]))
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=np.stack(xs), labels=np.array(labels), index=np.array(index))
        print(f"[fsdd] {len(files)} clips -> log-mel 32x32 in {time.perf_counter() - t0:.0f} s")
    data = np.load(cache)
    x = data["x"][..., None].astype("float32")
    x = (x - x.mean()) / x.std()
    y = keras.utils.to_categorical(data["labels"], 10).astype("float32")
    test = data["index"] < 5  # the dataset's official test split: recordings 0-4 of every speaker and digit
    return Task("fsdd", x[~test], y[~test], x[test], y[test], small_cnn((32, 32, 1), 10, (16, 32, 64), pool=True),
                epochs=3, notes="FSDD (real speech, 8 kHz), 2700 train / 300 official test, log-mel 32x32, "
                                "CNN 16-32-64, adamw, 3 epochs")  # fmt: skip


def birds_task() -> Task:
    from birdnet_stm32.config import Config
    from birdnet_stm32.data.dataset import prepare_datasets
    from birdnet_stm32.data.synthetic import DemoDataConfig, make_demo_dataset
    from birdnet_stm32.models import build_model

    cfg = Config.from_dict({
        "audio": {"n_fft": 256, "spec_width": 64, "n_mels": 32},
        "model": {"alpha": 0.25, "bn_momentum": 0.9},
        "data": {"cache_dir": str(CACHE / "features"), "workers": 2},
    }).validate()  # fmt: skip
    data_dir = CACHE / "demo_birds"
    print(make_demo_dataset(data_dir, DemoDataConfig(noise_class=False)))
    train, val = prepare_datasets(data_dir, cfg.audio, cfg.data, seed=0)

    def build(seed):
        import keras

        keras.utils.set_random_seed(seed)
        return build_model(cfg.audio, cfg.model, len(train.classes))

    return Task("birds", train.x, train.y, val.x, val.y, build, epochs=6,
                notes=f"synthetic birds ({len(train.classes)} species, {len(train)} train / {len(val)} val chunks), "
                      "project DS-CNN alpha 0.25, hybrid frontend 129x64, adamw, 6 epochs")  # fmt: skip


# -------------------------------------------------------------------------------------------------------- training


class Trainer:
    """One compiled model per task; every run resets weights, optimizer state and LR curve (no retracing)."""

    def __init__(self, task: Task):
        import keras

        self.task = task
        self.model = task.build(0)
        self.optimizer = make_optimizer(task.optimizer, 1e-3)
        self.model.compile(optimizer=self.optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
        self.total = task.epochs * task.steps_per_epoch

        class AssignLR(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.curve, self.step = None, 0

            def on_train_batch_begin(self, batch, logs=None):
                self.model.optimizer.learning_rate.assign(self.curve[min(self.step, len(self.curve) - 1)])
                self.step += 1

        self.assign = AssignLR()

    def reset(self, seed: int) -> None:
        if seed not in self.task.init_cache:
            self.task.init_cache[seed] = [v.numpy() for v in self.task.build(seed).variables]
        for var, value in zip(self.model.variables, self.task.init_cache[seed], strict=True):
            var.assign(value)
        for var in self.optimizer.variables:
            var.assign(np.zeros(var.shape, var.dtype))

    def curve(self, schedule: str, lr: float) -> np.ndarray:
        from birdnet_stm32.training.schedules import build_schedule, lr_curve

        return lr_curve(build_schedule(schedule, lr, self.task.steps_per_epoch, self.task.epochs), self.total)

    def run(self, schedule: str, lr: float, seed: int) -> dict[str, float]:
        self.reset(seed)
        self.assign.curve, self.assign.step = self.curve(schedule, lr), 0
        history = self.model.fit(train_dataset(self.task, seed), epochs=1, steps_per_epoch=self.total,
                                 callbacks=[self.assign], verbose=0, shuffle=False)  # fmt: skip
        loss, acc = self.model.evaluate(self.task.x_val, self.task.y_val, batch_size=256, verbose=0)
        diverged = not (math.isfinite(loss) and math.isfinite(history.history["loss"][-1]))
        return {"acc": float(acc), "loss": float(loss) if math.isfinite(loss) else float("nan"), "diverged": diverged}

    def epoch_time(self) -> float:
        """Steady-state wall time of one epoch (after tracing)."""
        self.reset(0)
        self.assign.curve, self.assign.step = np.full(10**6, 1e-3), 0
        ds = train_dataset(self.task, 0)
        self.model.fit(ds, epochs=1, steps_per_epoch=3, callbacks=[self.assign], verbose=0, shuffle=False)
        t0 = time.perf_counter()
        self.model.fit(ds, epochs=1, steps_per_epoch=self.task.steps_per_epoch, callbacks=[self.assign], verbose=0,
                       shuffle=False)  # fmt: skip
        return time.perf_counter() - t0


def make_optimizer(name: str, lr):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)
    return keras.optimizers.AdamW(lr, weight_decay=1e-4)


def train_dataset(task: Task, seed: int):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((task.x_train, task.y_train))
    return ds.shuffle(len(task.x_train), seed=seed).batch(task.batch_size, drop_remainder=True).repeat()


# ---------------------------------------------------------------------------------------------------------- sweeps


def sweep_ours(task: Task, seed: int):
    from birdnet_stm32.training.lr_finder import find_lr

    model = task.build(seed)
    model.compile(optimizer=make_optimizer(task.optimizer, 1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    result = find_lr(model, train_dataset(task, seed), seed=seed, progress=False)
    return result, time.perf_counter() - t0


def sweep_seed_baseline(task: Task, seed: int) -> float:
    """The seed implementation, faithfully (only ``set_value`` -> ``assign`` so it runs on Keras 3)."""
    import keras

    class SeedLRFinder(keras.callbacks.Callback):
        def __init__(self, min_lr=1e-7, max_lr=1.0, num_steps=200):
            super().__init__()
            self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps
            self.lrs, self.losses, self._step, self._best_loss = [], [], 0, float("inf")

        def on_train_batch_begin(self, batch, logs=None):
            frac = self._step / max(self.num_steps - 1, 1)
            self.model.optimizer.learning_rate.assign(self.min_lr * (self.max_lr / self.min_lr) ** frac)

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss", 0.0)
            self.lrs.append(float(self.model.optimizer.learning_rate.numpy()))
            self.losses.append(float(loss))
            if loss < self._best_loss:
                self._best_loss = loss
            if loss > 4 * self._best_loss and self._step > 10:
                self.model.stop_training = True
            self._step += 1
            if self._step >= self.num_steps:
                self.model.stop_training = True

        def suggest_lr(self, smoothing=5):
            if len(self.losses) < smoothing + 2:
                return self.lrs[len(self.lrs) // 2] if self.lrs else 1e-3
            smoothed = np.convolve(self.losses, np.ones(smoothing) / smoothing, mode="valid")
            log_lrs = np.log10(self.lrs[: len(smoothed)])
            return float(10 ** log_lrs[int(np.argmin(np.gradient(smoothed, log_lrs)))])

    model = task.build(seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-7), loss="categorical_crossentropy")
    finder = SeedLRFinder()
    model.fit(train_dataset(task, seed), epochs=1, steps_per_epoch=200, callbacks=[finder], verbose=0, shuffle=False)
    return finder.suggest_lr()


# --------------------------------------------------------------------------------------------------------- scoring


class GridCurve:
    """Mean validation accuracy and loss over training seeds, per grid LR; interpolated in log LR."""

    def __init__(self, runs: dict[float, list[dict]]):
        self.lrs = np.array(sorted(runs))
        self.acc = np.array([np.mean([r["acc"] for r in runs[lr]]) for lr in self.lrs])
        self.loss = np.array(
            [np.mean([r["loss"] if not r["diverged"] else np.nan for r in runs[lr]]) for lr in self.lrs]
        )
        self.diverged = np.array([any(r["diverged"] for r in runs[lr]) for lr in self.lrs])
        self.best = int(np.argmax(self.acc))

    @property
    def best_lr(self) -> float:
        return float(self.lrs[self.best])

    def at(self, lr: float) -> tuple[float, float, bool]:
        """Accuracy, loss and "diverged" at ``lr``; outside the grid, the nearest end (flagged if it diverged)."""
        x = np.log10(self.lrs)
        q = np.clip(np.log10(lr), x[0], x[-1])
        acc = float(np.interp(q, x, self.acc))
        loss = float(np.interp(q, x, np.nan_to_num(self.loss, nan=1e3)))
        right = min(int(np.searchsorted(x, q)), len(x) - 1)
        return acc, loss, bool(self.diverged[right] and self.diverged[max(right - 1, 0)])


def regret(curve: GridCurve, lr: float) -> dict[str, Any]:
    acc, loss, diverged = curve.at(lr)
    best_loss = np.nanmin(curve.loss)
    return {"lr": lr, "acc_regret": 100 * (curve.acc[curve.best] - acc), "loss_regret": loss - best_loss,
            "diverged": diverged}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------- run


def run_task(task: Task, args) -> dict[str, Any]:
    from birdnet_stm32.training.lr_analysis import LRFinderResult

    print(f"\n=== {task.name}: {task.notes}")
    trainer = Trainer(task)
    t0 = time.perf_counter()
    lo, hi = task.grid
    grid_lrs = 10 ** np.arange(lo, hi + 1e-9, 1.0 / args.per_decade)
    grid = {s: {float(lr): [] for lr in grid_lrs} for s in ("constant", "cosine")}
    for schedule in grid:
        for lr in grid_lrs:
            for seed in range(args.train_seeds):
                grid[schedule][float(lr)].append(trainer.run(schedule, float(lr), seed))
    curves = {s: GridCurve(runs) for s, runs in grid.items()}
    grid_time = time.perf_counter() - t0
    for s, c in curves.items():
        print(f"[{task.name}] grid {s:8s}: best lr {c.best_lr:.2e} acc {100 * c.acc[c.best]:.1f}% "
              f"({len(grid_lrs)} lrs x {args.train_seeds} seeds)")  # fmt: skip

    sweeps, baseline, sweep_times = [], [], []
    for seed in range(args.sweep_seeds):
        result, seconds = sweep_ours(task, 100 + seed)
        sweeps.append(result)
        sweep_times.append(seconds)
        baseline.append(sweep_seed_baseline(task, 100 + seed))
        print(f"[{task.name}] sweep seed {seed}: ok={result.ok} stop={result.stop_reason} "
              f"valley={_f(result.suggestions['valley'])} min/10={_f(result.suggestions['minimum'])} "
              f"steepest={_f(result.suggestions['steepest'])} div={_f(result.suggestions['divergence'])} "
              f"| seed rule {baseline[-1]:.2e} ({seconds:.1f} s)")  # fmt: skip

    # Every rule x multiplier on both grids (interpolated): the table the recommendation is chosen from.
    multipliers = [10 ** (k / 4) for k in range(-4, 9)]
    rule_table = {}
    for smoothing in args.smoothings:
        analysed = [LRFinderResult.from_sweep(r.lrs, r.losses, smoothing=smoothing, num_steps=200) for r in sweeps]
        for rule in RULES:
            for m in multipliers:
                for s, curve in curves.items():
                    picks = [a.suggestions[rule] for a in analysed if a.ok and a.suggestions[rule]]
                    regrets = [regret(curve, p * m) for p in picks]
                    rule_table[f"{smoothing}|{rule}|{m:.3g}|{s}"] = {
                        "mean_acc_regret": float(np.mean([r["acc_regret"] for r in regrets])) if regrets else None,
                        "worst_acc_regret": float(np.max([r["acc_regret"] for r in regrets])) if regrets else None,
                        "failed": len(analysed) - len(picks),
                    }

    # The recommendations (default smoothing) and the seed's rule: interpolated and trained for real.
    picks = {
        "ours_constant": ("constant", [r.recommended_lr for r in sweeps]),
        "ours_peak": ("cosine", [r.recommended_peak_lr for r in sweeps]),
        "seed_constant": ("constant", baseline),
        "seed_peak": ("cosine", baseline),
    }
    scored = {}
    for name, (schedule, lrs) in picks.items():
        rows = []
        for lr in lrs:
            if lr is None:
                rows.append({"lr": None, "acc_regret": None, "failed": True})
                continue
            row = regret(curves[schedule], lr)
            if args.verify:
                real = [trainer.run(schedule, lr, seed) for seed in range(args.train_seeds)]
                row["trained_acc_regret"] = 100 * (curves[schedule].acc[curves[schedule].best]
                                                   - np.mean([r["acc"] for r in real]))  # fmt: skip
                row["trained_diverged"] = any(r["diverged"] for r in real)
            rows.append(row)
        ok_rows = [r for r in rows if r.get("lr")]
        log_lrs = np.log10([r["lr"] for r in ok_rows]) if ok_rows else np.array([np.nan])
        key = "trained_acc_regret" if args.verify else "acc_regret"
        regrets_ = [r[key] for r in ok_rows]
        scored[name] = {
            "rows": rows,
            "median_lr": float(10 ** np.median(log_lrs)),
            "mean_acc_regret": float(np.mean(regrets_)) if regrets_ else None,
            "worst_acc_regret": float(np.max(regrets_)) if regrets_ else None,
            "mean_loss_regret": float(np.mean([r["loss_regret"] for r in ok_rows])) if ok_rows else None,
            "catastrophic": sum(
                1 for r in rows if r.get("failed") or r[key] > 10 or r.get("diverged") or r.get("trained_diverged")
            ),  # fmt: skip
            "spread_std_decades": float(np.std(log_lrs)),
            "spread_range_decades": float(np.ptp(log_lrs)),
        }

    # Cost.
    epoch_s = trainer.epoch_time()
    overhead = step_overhead(task)
    out = {
        "task": task.name,
        "notes": task.notes,
        "grid": {
            s: {
                "lrs": c.lrs.tolist(),
                "acc": c.acc.tolist(),
                "loss": c.loss.tolist(),
                "best_lr": c.best_lr,
                "best_acc": float(c.acc[c.best]),
            }
            for s, c in curves.items()
        },  # fmt: skip
        "cosine_over_constant": curves["cosine"].best_lr / curves["constant"].best_lr,
        "sweeps": [r.to_dict() for r in sweeps],
        "seed_rule": baseline,
        "scored": scored,
        "rule_table": rule_table,
        "cost": {
            "epoch_s": epoch_s,
            "steps_per_epoch": task.steps_per_epoch,
            "sweep_total_s": float(np.median(sweep_times)),
            "sweep_loop_s": float(np.median([r.metadata["wall_time_s"] for r in sweeps])),
            "sweep_steps": float(np.median([r.metadata["recorded_steps"] for r in sweeps])),
            **overhead,
        },
        "grid_time_s": grid_time,
    }
    print_task(out)
    return out


def step_overhead(task: Task, steps: int = 150, repeats: int = 5) -> dict[str, float]:
    """Median per-step time of plain ``fit`` vs ``fit`` with the LRFinder callback, as ``find_lr`` runs it.

    The same compiled model (optimizer LR given as a schedule, like the sweep's clone) alternates between a plain
    ``fit`` and a ``fit`` with the callback; the first steps after each (re)trace are skipped.
    """
    import keras

    from birdnet_stm32.training.lr_finder import LRFinder
    from birdnet_stm32.training.schedules import Constant

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    model = task.build(0)
    model.compile(optimizer=make_optimizer(task.optimizer, Constant(1e-11)), loss="categorical_crossentropy")
    ds = train_dataset(task, 0)
    plain, swept = [], []
    for _ in range(repeats):
        for with_finder in (False, True):
            timer = StepTimer()
            # A range far too low to diverge: the sweep runs every step.
            callbacks = (
                [LRFinder(1e-12, 1e-11, num_steps=steps + 10, progress=False), timer] if with_finder else [timer]
            )
            model.fit(ds, epochs=1, steps_per_epoch=steps, callbacks=callbacks, verbose=0, shuffle=False)
            (swept if with_finder else plain).append(float(np.median(np.diff(timer.times)[10:])))
    p, s = float(np.median(plain)), float(np.median(swept))
    return {
        "plain_step_ms": 1000 * p,
        "finder_step_ms": 1000 * s,
        "overhead_pct": 100 * (s / p - 1),
        "overhead_runs_pct": [round(100 * (b / a - 1), 1) for a, b in zip(plain, swept, strict=True)],
    }


def print_task(out: dict[str, Any]) -> None:
    name = out["task"]
    g = out["grid"]
    print(f"\n[{name}] grid best: constant {g['constant']['best_lr']:.2e} ({100 * g['constant']['best_acc']:.1f}%), "
          f"cosine peak {g['cosine']['best_lr']:.2e} ({100 * g['cosine']['best_acc']:.1f}%), "
          f"ratio {out['cosine_over_constant']:.2f}")  # fmt: skip
    print(f"[{name}] {'pick':14s} {'median lr':>10s} {'mean regret':>12s} {'worst':>7s} {'loss regret':>12s} "
          f"{'catastr.':>9s} {'spread std/range (dec)':>24s}")  # fmt: skip
    for pick, s in out["scored"].items():
        print(f"[{name}] {pick:14s} {s['median_lr']:10.2e} {_n(s['mean_acc_regret']):>12s} "
              f"{_n(s['worst_acc_regret']):>7s} "
              f"{_n(s['mean_loss_regret'], 3):>12s} {s['catastrophic']:>9d} "
              f"{s['spread_std_decades']:>11.2f} / {s['spread_range_decades']:.2f}")  # fmt: skip
    c = out["cost"]
    print(f"[{name}] cost: epoch {c['epoch_s']:.2f} s ({c['steps_per_epoch']} steps); sweep {c['sweep_total_s']:.1f} s "
          f"total / {c['sweep_loop_s']:.1f} s loop ({c['sweep_steps']:.0f} steps) = "
          f"{c['sweep_total_s'] / c['epoch_s']:.1f} / {c['sweep_loop_s'] / c['epoch_s']:.1f} epochs; "
          f"step {c['plain_step_ms']:.2f} ms plain vs {c['finder_step_ms']:.2f} ms with LRFinder "
          f"({c['overhead_pct']:+.1f} %)")  # fmt: skip


def summarize(results: list[dict[str, Any]], smoothings) -> None:
    print("\n=== summary over tasks")
    for smoothing in smoothings:
        for schedule in ("constant", "cosine"):
            print(
                f"rule table (smoothing {smoothing}, {schedule}): mean accuracy regret in points, "
                "averaged over tasks, per multiplier of the rule's LR"
            )
            for rule in RULES:
                cells = []
                for k in range(-4, 9):
                    m = 10 ** (k / 4)
                    vals = [
                        r["rule_table"][f"{smoothing}|{rule}|{m:.3g}|{schedule}"]["mean_acc_regret"] for r in results
                    ]
                    worst = [
                        r["rule_table"][f"{smoothing}|{rule}|{m:.3g}|{schedule}"]["worst_acc_regret"] for r in results
                    ]
                    cells.append("  n/a" if None in vals else f"{np.mean(vals):5.1f}/{np.max(worst):<5.1f}")
                print(f"  {rule:9s} " + " ".join(cells))
            print("  multipliers: " + " ".join(f"{10 ** (k / 4):11.2f}" for k in range(-4, 9)))
    ratios = [r["cosine_over_constant"] for r in results]
    print(
        f"grid-best cosine peak / constant LR per task: {', '.join(f'{x:.2f}' for x in ratios)} "
        f"(geometric mean {math.exp(np.mean(np.log(ratios))):.2f})"
    )


def _f(x):
    return "-" if x is None else f"{x:.2e}"


def _n(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,digits_sgd,fsdd,birds")
    parser.add_argument("--quick", action="store_true", help="digits only, 3 points/decade, 2 sweep seeds, 1 seed")
    parser.add_argument("--sweep-seeds", type=int, default=5)
    parser.add_argument("--train-seeds", type=int, default=2)
    parser.add_argument("--per-decade", type=int, default=4)
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="score picks on the grid only")
    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")
    parser.add_argument("--plot", type=Path, help="only save the plot of one sweep (seed 100) on the first task")
    args = parser.parse_args(argv)
    args.smoothings = (5, 10, 20)
    if args.quick:
        args.tasks, args.per_decade, args.sweep_seeds, args.train_seeds = "digits", 3, 2, 1
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; command: python bench/lr_finder.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")  # fmt: skip
    makers = {"digits": digits_task, "digits_sgd": lambda: digits_task("sgd"), "fsdd": fsdd_task, "birds": birds_task}
    if args.plot:
        task = makers[args.tasks.split(",")[0]]()
        result, seconds = sweep_ours(task, 100)
        result.plot(args.plot)
        print(result.summary())
        print(f"{task.notes}; sweep {seconds:.1f} s; plot written to {args.plot}")
        return 0
    results = []
    for name in args.tasks.split(","):
        task = makers[name]()
        if task is not None:
            results.append(run_task(task, args))
    summarize(results, args.smoothings)
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
