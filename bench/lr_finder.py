"""Benchmark of the LR finder: regret against a grid search, stability across seeds, and cost.

For every task the learning rate is grid-searched on a fixed short training budget (4 points per decade, 2-3
training seeds, more with ``--train-seeds``) for a constant schedule and for the project's warmup + cosine
schedule; a run is scored like the trainer keeps its model: the best validation accuracy over the epochs (and
the validation loss of that epoch). Then the LR range test runs with 5 sweep seeds (``--sweep-seeds``), and every
suggestion is scored by its *regret* in accuracy points, two ways:

- *trained*: each recommended LR is trained on fresh seeds (``--verify-seeds``, default the task's) and compared
  with the grid's best LR trained on as many fresh seeds as all the picks together (the *reference*: what the
  grid search really delivers, free of the winner's curse of picking the luckiest grid point); with its
  standard error. The grid's best accuracy minus the reference's is the *noise floor*.
- *smoothed grid*: every rule (and every multiple of it) is read off the grid curve, interpolated in log LR
  after a light 3-point smoothing that tames the winner's curse of a noisy grid.

For a constant schedule the constant-LR probes (``--probe-steps``) pick the recommendation; the ways of reading
them are compared on the grid too. The seed implementation (moving average of Keras' running-mean loss,
steepest gradient, Adam recompile) is re-implemented here as the baseline.

Tasks (AdamW, weight decay 1e-4, batch 32 — the project's defaults):

- ``digits``: scikit-learn's 8x8 digits, a small CNN (4 epochs).
- ``digits_sgd``: the same with SGD + Nesterov momentum 0.9 (the project's ``--optimizer sgd``); swept up to
  ``max_lr=10`` as the finder's own warning advises (with the default ``max_lr=1`` the loss is still falling).
- ``fsdd``: the Free Spoken Digit Dataset from ``../shared/data/fsdd`` (skipped when absent), log-mel + CNN.
- ``birds``: the project's synthetic bird calls (``birdnet_stm32.data.synthetic``) with the demo's input size,
  DS-CNN and number of epochs (``birdnet_stm32.demo.demo_config``): what ``make demo`` trains.

Cost: the sweep's wall time against one training epoch, and the callback's per-step overhead against a plain
``fit`` of the same model.

Usage::

    python bench/lr_finder.py                 # everything, default seeds (~2 h on 2 CPU cores)
    python bench/lr_finder.py --quick         # smoke run: digits only, coarse, 2 seeds (~2 min)
    python bench/lr_finder.py --schedules constant --train-seeds 6 --json const.json   # the constant grids
    python bench/lr_finder.py --schedules constant --grid-from const.json --sweep-seeds 10 --json c.json
    python bench/lr_finder.py --report c.json cosine.json   # the summary tables of saved runs, merged
    python bench/lr_finder.py --cost-only     # sweep time and per-step overhead (run it alone)
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
RULES = ("valley", "minimum", "steepest", "divergence")
MULTIPLIER_STEPS = range(-8, 5)  # rule LR x 10**(k/4): 0.01 .. 10


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
    train_seeds: int = 2
    verify_seeds: int = 6  # fresh seeds for the reference and every trained pick
    sweep_max_lr: float = 1.0
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
    sgd = optimizer == "sgd"
    return Task(f"digits{'_sgd' if sgd else ''}", x[train], y[train], x[val], y[val], small_cnn((8, 8, 1), 10),
                epochs=4, optimizer=optimizer, grid=(-3.5, 1.0) if sgd else (-4.5, 0.0), train_seeds=3, verify_seeds=24,
                sweep_max_lr=10.0 if sgd else 1.0,
                notes=f"sklearn digits 8x8, 1437 train / 360 val, CNN 16-32, {optimizer}, 4 epochs"
                      + (", swept to max_lr=10" if sgd else ""))  # fmt: skip


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
                epochs=3, verify_seeds=12,
                notes="FSDD (real speech, 8 kHz), 2700 train / 300 official test, log-mel 32x32, CNN 16-32-64, adamw, "
                      "3 epochs")  # fmt: skip


def birds_task() -> Task:
    """The demo's own problem: its input size, model and epochs (``birdnet_stm32.demo.demo_config``) on its species."""
    from birdnet_stm32.data.dataset import prepare_datasets
    from birdnet_stm32.data.synthetic import DemoDataConfig, make_demo_dataset
    from birdnet_stm32.demo import demo_config
    from birdnet_stm32.models import build_model

    cfg = demo_config()
    cfg.data.cache_dir, cfg.data.workers = str(CACHE / "features"), 2
    data_dir = CACHE / "demo_birds"
    # The species only: the bench scores plain top-1 accuracy, which has no answer for a background-only chunk.
    print(make_demo_dataset(data_dir, DemoDataConfig(noise_class=False)))
    train, val = prepare_datasets(data_dir, cfg.audio, cfg.data, seed=0)

    def build(seed):
        import keras

        keras.utils.set_random_seed(seed)
        return build_model(cfg.audio, cfg.model, len(train.classes))

    shape = "x".join(str(v) for v in train.x.shape[1:3])
    return Task("birds", train.x, train.y, val.x, val.y, build, epochs=cfg.train.epochs, grid=(-4.0, -0.5),
                notes=f"synthetic birds ({len(train.classes)} species, {len(train)} train / {len(val)} val chunks), "
                      f"the demo's DS-CNN (alpha {cfg.model.alpha}, {cfg.audio.frontend} frontend {shape}), "
                      f"adamw, {cfg.train.epochs} epochs")  # fmt: skip


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
        """Train on the budget; score the checkpoint the trainer would keep (best validation accuracy)."""
        self.reset(seed)
        self.assign.curve, self.assign.step = self.curve(schedule, lr), 0
        val = (self.task.x_val, self.task.y_val)
        h = self.model.fit(train_dataset(self.task, seed), epochs=self.task.epochs, validation_data=val,
                           validation_batch_size=256, steps_per_epoch=self.task.steps_per_epoch,
                           callbacks=[self.assign], verbose=0, shuffle=False).history  # fmt: skip
        acc = np.nan_to_num(np.array(h["val_accuracy"], dtype=float), nan=0.0)
        best = int(np.argmax(acc))
        loss = float(h["val_loss"][best])
        diverged = not all(math.isfinite(v) for v in h["loss"])
        return {"acc": float(acc[best]), "loss": loss if math.isfinite(loss) else float("nan"), "diverged": diverged}

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


def sweep_ours(task: Task, seed: int, probe_steps: int = 0):
    from birdnet_stm32.training.lr_finder import find_lr

    model = task.build(seed)
    model.compile(optimizer=make_optimizer(task.optimizer, 1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    result = find_lr(model, train_dataset(task, seed), max_lr=task.sweep_max_lr, seed=seed, progress=False,
                     probe_steps=probe_steps)  # fmt: skip
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
    finder = SeedLRFinder(max_lr=task.sweep_max_lr)
    model.fit(train_dataset(task, seed), epochs=1, steps_per_epoch=200, callbacks=[finder], verbose=0, shuffle=False)
    return finder.suggest_lr()


# --------------------------------------------------------------------------------------------------------- scoring


class GridCurve:
    """Mean validation accuracy and loss over training seeds, per grid LR; read in log LR.

    ``smooth`` is the accuracy after a [1/4, 1/2, 1/4] smoothing across neighbouring grid points (a quarter of a
    decade apart): a lucky seed at one grid point no longer defines "the best".
    """

    def __init__(self, runs: dict[float, list[dict]]):
        self.lrs = np.array(sorted(runs))
        self.acc = 100 * np.array([np.mean([r["acc"] for r in runs[lr]]) for lr in self.lrs])
        self.smooth = np.convolve(np.pad(self.acc, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
        losses = [[r["loss"] if not r["diverged"] else np.nan for r in runs[lr]] for lr in self.lrs]
        self.loss = np.array([np.mean(v) for v in losses])
        self.best = int(np.argmax(self.acc))

    @property
    def best_lr(self) -> float:
        return float(self.lrs[self.best])

    def regret(self, lr: float) -> dict[str, Any]:
        """Accuracy regret (raw and smoothed grid) and loss regret at ``lr``; outside the grid, its nearest end."""
        x = np.log10(self.lrs)
        q = float(np.clip(np.log10(lr), x[0], x[-1]))
        loss = float(np.interp(q, x, np.nan_to_num(self.loss, nan=1e3)))
        return {
            "lr": lr,
            "acc_regret": float(self.acc[self.best] - np.interp(q, x, self.acc)),
            "smooth_regret": float(self.smooth.max() - np.interp(q, x, self.smooth)),
            "loss_regret": loss - float(np.nanmin(self.loss)),
            "outside_grid": not x[0] <= np.log10(lr) <= x[-1],
        }


# ------------------------------------------------------------------------------------------------------------- run


def run_task(task: Task, args) -> dict[str, Any]:
    from birdnet_stm32.training.lr_analysis import LRFinderResult

    print(f"\n=== {task.name}: {task.notes}")
    trainer = Trainer(task)
    seeds = range(args.train_seeds or task.train_seeds)
    t0 = time.perf_counter()
    if args.grid_from:  # the grids of an earlier --json run
        saved = next(r for r in json.loads(args.grid_from.read_text()) if r["task"] == task.name)
        curves = {s: saved_curve(g) for s, g in saved["grid"].items() if s in args.schedules}
    else:
        curves = search_grids(task, trainer, seeds, args)
    grid_time = time.perf_counter() - t0
    fresh = range(1000, 1000 + (args.verify_seeds or task.verify_seeds))
    many = range(1000, 1000 + len(fresh) * args.sweep_seeds)  # as many runs as all picks together
    reference = {s: reference_runs(trainer, s, c, many) for s, c in curves.items()} if args.verify else {}

    sweeps, baseline, sweep_times = [], [], []
    for seed in range(args.sweep_seeds):
        result, seconds = sweep_ours(task, 100 + seed, args.probe_steps)
        sweeps.append(result)
        sweep_times.append(seconds)
        baseline.append(sweep_seed_baseline(task, 100 + seed))
        s = result.suggestions
        print(f"[{task.name}] sweep seed {seed}: ok={result.ok} stop={result.stop_reason} valley={_f(s['valley'])} "
              f"min/10={_f(s['minimum'])} steepest={_f(s['steepest'])} div={_f(s['divergence'])} "
              f"| seed rule {baseline[-1]:.2e} ({seconds:.1f} s) {'; '.join(result.warnings)}")  # fmt: skip
        if result.probes:
            tried = zip(result.probes["lrs"], result.probes["losses"], strict=True)
            print(f"[{task.name}]   probes {', '.join(f'{lr:.2e}: {v:.3f}' for lr, v in tried)}"
                  f" -> constant {_f(result.recommended_lr)}")  # fmt: skip

    # Every rule x multiplier, read off both (smoothed) grids: how the recommendations were chosen.
    rule_table = {}
    for smoothing in args.smoothings:
        analysed = [LRFinderResult.from_sweep(r.lrs, r.losses, smoothing=smoothing, num_steps=200) for r in sweeps]
        for rule in RULES:
            picks = [a.suggestions[rule] for a in analysed if a.ok and a.suggestions[rule]]
            for k in MULTIPLIER_STEPS:
                for s, curve in curves.items():
                    regrets = [curve.regret(p * 10 ** (k / 4))["smooth_regret"] for p in picks]
                    rule_table[f"{smoothing}|{rule}|{k}|{s}"] = {
                        "mean": float(np.mean(regrets)) if regrets else None,
                        "worst": float(np.max(regrets)) if regrets else None,
                        "missing": len(analysed) - len(picks),
                    }

    # Every way of reading the constant-LR probes, off the constant grid: how the probes' rule was chosen.
    probe_table = {}
    if "constant" in curves and any(r.probes for r in sweeps):
        picks_by_rule: dict[str, list[float]] = {}
        for r in sweeps:
            for rule, lr in probe_picks(r).items():
                picks_by_rule.setdefault(rule, []).append(lr)
        for rule, lrs in picks_by_rule.items():
            regrets = [curves["constant"].regret(lr)["smooth_regret"] for lr in lrs]
            probe_table[rule] = {
                "mean": float(np.mean(regrets)),
                "worst": float(np.max(regrets)),
                "spread": float(np.std(np.log10(lrs))),
                "median_lr": float(10 ** np.median(np.log10(lrs))),
            }
            print(f"[{task.name}] probe rule {rule:16s} median {probe_table[rule]['median_lr']:.2e}: smoothed-grid "
                  f"regret {probe_table[rule]['mean']:.1f}/{probe_table[rule]['worst']:.1f}, "
                  f"spread {probe_table[rule]['spread']:.2f} dec.")  # fmt: skip

    # The recommendations (trained for real) and the seed's rule (read off the grid).
    picks = {
        "ours_constant": ("constant", [r.recommended_lr for r in sweeps], True),
        "valley_constant": ("constant", [r.suggestions["valley"] if r.ok else None for r in sweeps], False),
        "ours_peak": ("cosine", [r.recommended_peak_lr for r in sweeps], True),
        "seed_constant": ("constant", baseline, False),
        "seed_peak": ("cosine", baseline, False),
    }
    scored = {name: score_pick(trainer, s, curves[s], lrs, reference.get(s) if train else None, fresh)
              for name, (s, lrs, train) in picks.items() if s in curves}  # fmt: skip

    epoch_s = trainer.epoch_time()
    out = {
        "task": task.name,
        "notes": task.notes,
        "grid": {
            s: {
                "lrs": c.lrs.tolist(),
                "acc": c.acc.tolist(),
                "smooth_acc": c.smooth.tolist(),
                "loss": c.loss.tolist(),
                "best_lr": c.best_lr,
                "best_acc": float(c.acc[c.best]),
            }
            for s, c in curves.items()
        },  # fmt: skip
        "reference": reference,
        "noise_floor": {sch: noise_floor(curves[sch], ref) for sch, ref in reference.items()},
        **grid_ratios(curves),
        "sweeps": [{**r.to_dict(), "lrs": r.lrs.tolist(), "losses": r.losses.tolist()} for r in sweeps],
        "seed_rule": baseline,
        "scored": scored,
        "rule_table": rule_table,
        "probe_table": probe_table,
        "cost": sweep_cost(task, sweeps, sweep_times, epoch_s),
        "grid_time_s": grid_time,
    }
    print_task(out)
    return out


def probe_picks(result) -> dict[str, float]:
    """The constant LR that each candidate rule reads off a sweep's probes (``valley``: no probes)."""
    out = {"valley": result.suggestions["valley"]}
    p = result.probes
    if p and p["picked"] is not None:  # "picked" is None when every probe diverged
        scores = [math.inf if v is None else v for v in p["losses"]]
        out["lowest probe"] = float(p["lrs"][int(np.argmin(scores))])
        out["parabola"] = p["picked"]  # the finder's own pick (LRFinderResult.with_probes)
    return out


def search_grids(task: Task, trainer: Trainer, seeds, args) -> dict[str, GridCurve]:
    """Grid-search the LR for every schedule (``args.per_decade`` points per decade, every seed at each)."""
    lo, hi = task.grid
    grid_lrs = 10 ** np.arange(lo, hi + 1e-9, 1.0 / args.per_decade)
    curves = {}
    for s in args.schedules:
        c = curves[s] = GridCurve({float(lr): [trainer.run(s, float(lr), seed) for seed in seeds] for lr in grid_lrs})
        print(f"[{task.name}] grid {s:8s}: best lr {c.best_lr:.2e} acc {c.acc[c.best]:.1f}% (smoothed best "
              f"{c.smooth.max():.1f}%) ({len(grid_lrs)} lrs x {len(seeds)} seeds)")  # fmt: skip
    return curves


def reference_runs(trainer: Trainer, schedule: str, curve: GridCurve, fresh) -> list[float]:
    """The grid search's pick (its best LR) trained on fresh seeds: what a grid search really delivers.

    Every pick is trained on fresh seeds too and compared with this, so neither side profits from the selection
    of a lucky grid point (the grid's own best accuracy is biased upwards by that: the noise floor). The
    reference gets as many runs as all the picks together, so it is not the noisier side of the comparison.
    """
    accs = [trainer.run(schedule, curve.best_lr, seed)["acc"] for seed in fresh]
    print(f"[{trainer.task.name}] reference {schedule}: grid best lr {curve.best_lr:.2e} on {len(accs)} fresh seeds "
          f"{100 * np.mean(accs):.1f}% (grid {curve.acc[curve.best]:.1f}%)")  # fmt: skip
    return accs


def noise_floor(curve: GridCurve, reference: list[float]) -> float:
    """How much the grid's best accuracy overstates its best LR: grid accuracy minus fresh-seed accuracy."""
    return float(curve.acc[curve.best] - 100 * np.mean(reference))


def saved_curve(g: dict[str, Any]) -> GridCurve:
    """A grid saved by ``--json`` (mean accuracy and loss per LR) as a :class:`GridCurve`."""
    runs = {lr: [{"acc": a / 100, "loss": loss, "diverged": loss is None or not math.isfinite(loss)}]
            for lr, a, loss in zip(g["lrs"], g["acc"], g["loss"], strict=True)}  # fmt: skip
    return GridCurve(runs)


def grid_ratios(curves: dict[str, GridCurve]) -> dict[str, float]:
    """Grid-best cosine peak over grid-best constant LR, raw and on the smoothed grids (both grids needed)."""
    if set(curves) != {"constant", "cosine"}:
        return {}
    cos, const = curves["cosine"], curves["constant"]
    return {
        "cosine_over_constant": cos.best_lr / const.best_lr,
        "smoothed_cosine_over_constant": float(cos.lrs[np.argmax(cos.smooth)] / const.lrs[np.argmax(const.smooth)]),
    }


def score_pick(
    trainer: Trainer, schedule: str, curve: GridCurve, lrs: list, reference: list[float] | None, fresh
) -> dict[str, Any]:
    """Regret of one kind of pick over the sweep seeds: read off the grid, and trained on the fresh seeds.

    Trained (with ``reference``, the grid's best LR on the same fresh seeds): regret = reference accuracy minus
    the pick's, in points; its standard error treats every run as independent.
    """
    rows, accs = [], []
    for lr in lrs:
        if lr is None:
            rows.append({"lr": None, "failed": True})
            continue
        row = curve.regret(lr)
        if reference is not None:
            real = [trainer.run(schedule, lr, seed) for seed in fresh]
            row["accs"] = [r["acc"] for r in real]
            row["trained_regret"] = float(100 * (np.mean(reference) - np.mean(row["accs"])))
            row["diverged"] = any(r["diverged"] for r in real)
            accs.extend(row["accs"])
        rows.append(row)
    ok = [r for r in rows if r.get("lr")]
    log_lrs = np.log10([r["lr"] for r in ok]) if ok else np.array([np.nan])
    key = "trained_regret" if reference is not None else "acc_regret"

    def stat(values, fn):
        return float(fn(values)) if values else None

    se = None
    if reference is not None and len(accs) > 1:
        se = 100 * float(np.sqrt(np.var(reference, ddof=1) / len(reference) + np.var(accs, ddof=1) / len(accs)))
    return {
        "rows": rows,
        "trained": reference is not None,
        "median_lr": float(10 ** np.median(log_lrs)),
        "mean_regret": stat([r[key] for r in ok], np.mean),
        "regret_se": se,
        "worst_regret": stat([r[key] for r in ok], np.max),
        "mean_smooth_regret": stat([r["smooth_regret"] for r in ok], np.mean),
        "worst_smooth_regret": stat([r["smooth_regret"] for r in ok], np.max),
        "mean_loss_regret": stat([r["loss_regret"] for r in ok], np.mean),
        "catastrophic": sum(1 for r in rows if r.get("failed") or r[key] > 10 or r.get("diverged")),
        "spread_std_decades": float(np.std(log_lrs)),
        "spread_range_decades": float(np.ptp(log_lrs)),
    }


def sweep_cost(task: Task, sweeps=None, sweep_times=None, epoch_s=None) -> dict[str, Any]:
    """Sweep wall time against one training epoch, and the callback's per-step overhead (:func:`step_overhead`).

    Without ``sweeps`` (the ``--cost-only`` mode) one sweep (seed 100) is run and the epoch is timed here.
    """
    if sweeps is None:
        result, seconds = sweep_ours(task, 100)
        sweeps, sweep_times, epoch_s = [result], [seconds], Trainer(task).epoch_time()
    return {
        "epoch_s": epoch_s,
        "steps_per_epoch": task.steps_per_epoch,
        "sweep_total_s": float(np.median(sweep_times)),
        "sweep_loop_s": float(np.median([r.metadata["wall_time_s"] for r in sweeps])),
        "sweep_steps": float(np.median([r.metadata["recorded_steps"] for r in sweeps])),
        **step_overhead(task),
    }


def step_overhead(task: Task, pairs: int = 1000) -> dict[str, float]:
    """Per-step cost of the LRFinder (as ``find_lr`` runs it) against the same model's plain train step.

    The model's plain train function is traced first; then the LRFinder is installed, which traces the sweep's
    train function (the loss recorder inside, the sweep schedule driving the LR). The two then alternate step by
    step on the same data, the sweep's step together with the callback's own ``on_train_batch_begin`` and
    ``on_train_batch_end`` (buffer read every 4 steps included): neighbouring steps see the same machine, so
    this shared machine's drifts in speed, which are larger than the cost measured, cancel in each pair. The
    overhead is the median of the paired differences over the plain step's median (interquartile range too).
    The rest of ``fit`` (Keras' own per-step callback handling) is the same with or without the LRFinder.
    """
    from birdnet_stm32.training.lr_finder import LRFinder
    from birdnet_stm32.training.schedules import Constant

    model = task.build(0)
    model.compile(optimizer=make_optimizer(task.optimizer, Constant(1e-11)), loss="categorical_crossentropy")
    batches = iter(train_dataset(task, 0))
    model.make_train_function()
    plain = model.train_function
    for _ in range(5):
        float(plain(batches)["loss"])
    # A range far too low to change the weights, and more steps than are run: the sweep never stops.
    finder = LRFinder(1e-12, 1e-11, 2 * pairs + 100, progress=False)
    finder.set_model(model)
    finder.on_train_begin()
    swept = model.train_function

    def sweep_step(i: int) -> None:
        finder.on_train_batch_begin(i)
        float(swept(batches)["loss"])
        finder.on_train_batch_end(i)

    for i in range(5):
        sweep_step(i)
    t_plain, t_sweep = [], []
    for i in range(pairs):
        t0 = time.perf_counter()
        float(plain(batches)["loss"])
        t_plain.append(time.perf_counter() - t0)
        model.optimizer.iterations.assign_sub(1)  # the sweep's rows follow the optimizer's step counter
        t0 = time.perf_counter()
        sweep_step(5 + i)
        t_sweep.append(time.perf_counter() - t0)
    finder.on_train_end()
    if len(finder.losses) != pairs + 5:
        raise RuntimeError(f"the sweep recorded {len(finder.losses)} of {pairs + 5} steps")
    diff, base = np.array(t_sweep) - np.array(t_plain), float(np.median(t_plain))
    return {
        "overhead_pairs": pairs,
        "plain_step_ms": 1000 * base,
        "added_us": 1e6 * float(np.median(diff)),
        "added_iqr_us": [1e6 * float(np.percentile(diff, 25)), 1e6 * float(np.percentile(diff, 75))],
        "overhead_pct": 100 * float(np.median(diff)) / base,
    }


def print_task(out: dict[str, Any]) -> None:
    name = out["task"]
    best = ", ".join(f"{s} {g['best_lr']:.2e} ({g['best_acc']:.1f}%, noise floor {_n(out['noise_floor'].get(s))})"
                     for s, g in out["grid"].items())  # fmt: skip
    ratio = (f": peak / constant {out['cosine_over_constant']:.2f} ({out['smoothed_cosine_over_constant']:.2f} on "
             "the smoothed grids)" if "cosine_over_constant" in out else "")  # fmt: skip
    print(f"\n[{name}] grid best: {best}{ratio}")
    print(f"[{name}] {'pick':14s} {'median lr':>10s} {'regret mean+-se/worst':>22s} {'smoothed grid':>14s} "
          f"{'loss regret':>12s} {'catastr.':>9s} {'spread std/range (dec)':>23s}")  # fmt: skip
    for pick, s in out["scored"].items():
        kind = "trained" if s["trained"] else "grid"
        smooth = f"{_n(s['mean_smooth_regret'])}/{_n(s['worst_smooth_regret'])}"
        print(f"[{name}] {pick:14s} {s['median_lr']:10.2e} {_n(s['mean_regret']):>5s}+-{_n(s.get('regret_se')):<3s}/"
              f"{_n(s['worst_regret']):<5s}{kind:>7s} {smooth:>13s} "
              f"{_n(s['mean_loss_regret'], 3):>12s} {s['catastrophic']:>9d} "
              f"{s['spread_std_decades']:>14.2f} / {s['spread_range_decades']:.2f}")  # fmt: skip
    print_cost(name, out["cost"])


def print_cost(name: str, c: dict[str, Any]) -> None:
    lo, hi = c["added_iqr_us"]
    print(f"[{name}] cost: epoch {c['epoch_s']:.2f} s ({c['steps_per_epoch']} steps); sweep {c['sweep_total_s']:.1f} s "
          f"incl. clone and tracing, {c['sweep_loop_s']:.1f} s loop ({c['sweep_steps']:.0f} steps) = "
          f"{c['sweep_total_s'] / c['epoch_s']:.1f} / {c['sweep_loop_s'] / c['epoch_s']:.1f} epochs; per step "
          f"(median of {c['overhead_pairs']} paired steps) {c['added_us']:+.0f} us (IQR {lo:+.0f} .. {hi:+.0f}) on "
          f"{c['plain_step_ms']:.2f} ms: {c['overhead_pct']:+.1f} %")  # fmt: skip


def merge_results(paths: list[Path]) -> list[dict[str, Any]]:
    """The results of several ``--json`` runs, one entry per task (a constant-only and a cosine-only run merge)."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for r in json.loads(path.read_text()):
            m = merged.setdefault(r["task"], {**r, "grid": {}, "scored": {}, "rule_table": {}, "noise_floor": {}})
            for key in ("grid", "scored", "rule_table", "noise_floor"):
                m[key].update(r[key])
            m["probe_table"] = m.get("probe_table") or r.get("probe_table")
    for m in merged.values():
        m.update(grid_ratios({s: saved_curve(g) for s, g in m["grid"].items()}))
    return list(merged.values())


def summarize(results: list[dict[str, Any]], smoothings) -> None:
    print("\n=== summary over tasks")
    tasks = [r["task"] for r in results]
    for smoothing in smoothings:
        for schedule in dict.fromkeys(s for r in results for s in r["grid"]):
            have = [r for r in results if schedule in r["grid"]]
            print(f"rule x multiplier, {schedule} schedule, smoothing {smoothing}: regret on the smoothed grid, "
                  f"mean over tasks / worst sweep of any task ({', '.join(r['task'] for r in have)})")  # fmt: skip
            print("  multiplier " + " ".join(f"{10 ** (k / 4):>9.3g}" for k in MULTIPLIER_STEPS))
            for rule in RULES:
                cells = []
                for k in MULTIPLIER_STEPS:
                    cell = [r["rule_table"][f"{smoothing}|{rule}|{k}|{schedule}"] for r in have]
                    if any(c["mean"] is None for c in cell):
                        cells.append(f"{'n/a':>9s}")
                    else:
                        cells.append(f"{np.mean([c['mean'] for c in cell]):4.1f}/{max(c['worst'] for c in cell):<4.1f}")
                print(f"  {rule:10s} " + " ".join(cells))
    if all("cosine_over_constant" in r for r in results):
        ratios = [r["cosine_over_constant"] for r in results]
        smoothed = [r["smoothed_cosine_over_constant"] for r in results]
        pairs = ", ".join(f"{t} {x:.2f}" for t, x in zip(tasks, ratios, strict=True))
        print(f"grid-best cosine peak / constant LR: {pairs} (geometric mean {math.exp(np.mean(np.log(ratios))):.2f}); "
              f"on the smoothed grid: {', '.join(f'{x:.2f}' for x in smoothed)} "
              f"(geometric mean {math.exp(np.mean(np.log(smoothed))):.2f})")  # fmt: skip
    print(
        "targets per task: ours within 1 point (trained mean regret +- standard error | smoothed-grid mean), "
        "0 catastrophic, spread std <= 0.2 decades, better than the seed's rule, per-step overhead < 5 %"
    )
    for r in results:
        sc = r["scored"]
        for kind in ("constant", "peak"):
            if f"ours_{kind}" not in sc:
                continue
            ours, seed = sc[f"ours_{kind}"], sc[f"seed_{kind}"]
            better = (
                ours["mean_smooth_regret"] < seed["mean_smooth_regret"] and ours["catastrophic"] <= seed["catastrophic"]
            )
            floor = r["noise_floor"].get("constant" if kind == "constant" else "cosine")
            print(f"  {r['task']:11s} {kind:8s} regret {_n(ours['mean_regret'])} +- {_n(ours.get('regret_se'))} | "
                  f"{_n(ours['mean_smooth_regret'])} (noise floor {_n(floor)}), "
                  f"catastrophic {ours['catastrophic']}, spread {ours['spread_std_decades']:.2f}, "
                  f"seed rule {_n(seed['mean_smooth_regret'])} ({seed['catastrophic']} catastrophic): "
                  f"{'better' if better else 'NOT better'}; overhead {r['cost']['overhead_pct']:+.1f} %")  # fmt: skip


def _f(x):
    return "-" if x is None else f"{x:.2e}"


def _n(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,digits_sgd,fsdd,birds")
    parser.add_argument("--quick", action="store_true", help="digits only, 3 points/decade, 2 sweep seeds, 1 seed")
    parser.add_argument("--sweep-seeds", type=int, default=5)
    parser.add_argument("--train-seeds", type=int, help="training seeds per grid point (default: the task's, 2-3)")
    parser.add_argument("--verify-seeds", type=int, help="fresh seeds per trained pick (default: the task's)")
    parser.add_argument("--schedules", default="constant,cosine", help="grids to search: constant, cosine or both")
    parser.add_argument("--per-decade", type=int, default=4)
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="score picks on the grid only")
    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")
    parser.add_argument("--plot", type=Path, help="only save the plot of one sweep (seed 100) on the first task")
    parser.add_argument("--cost-only", action="store_true", help="only the cost figures (sweep time, overhead)")
    parser.add_argument("--probe-steps", type=int, default=100, help="steps of each constant-LR probe (0: off)")
    parser.add_argument("--grid-from", type=Path, help="take the grids from an earlier --json run, do not search")
    parser.add_argument("--report", type=Path, nargs="+", help="print the summary of earlier --json runs, merged")
    args = parser.parse_args(argv)
    args.smoothings = (5, 20)
    args.schedules = args.schedules.split(",")
    if args.quick:
        args.tasks, args.per_decade, args.sweep_seeds, args.train_seeds = "digits", 3, 2, 1
    args.tasks = args.tasks.split(",")
    if args.report:
        merged = merge_results(args.report)
        for r in merged:
            print_task(r)
        summarize(merged, args.smoothings)
        return 0
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; command: python bench/lr_finder.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")  # fmt: skip
    makers = {"digits": digits_task, "digits_sgd": lambda: digits_task("sgd"), "fsdd": fsdd_task, "birds": birds_task}
    if args.plot:
        task = makers[args.tasks[0]]()
        result, seconds = sweep_ours(task, 100)
        result.plot(args.plot)
        print(result.summary())
        print(f"{task.notes}; sweep {seconds:.1f} s; plot written to {args.plot}")
        return 0
    if args.cost_only:
        for name in args.tasks:
            if (task := makers[name]()) is not None:
                print_cost(task.name, sweep_cost(task))
        return 0
    results = []
    for name in args.tasks:
        task = makers[name]()
        if task is not None:
            results.append(run_task(task, args))
            if args.json:  # after every task: a crash or an interrupt keeps what was measured
                args.json.write_text(json.dumps(results, indent=1, default=float))
    summarize(results, args.smoothings)
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s")
    if args.json:
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
