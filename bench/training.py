"""Training benchmarks: pipeline overhead, step time, and --find-lr against a grid of fixed LRs.

    python bench/training.py            # everything (~25 min on 2 cores)
    python bench/training.py --quick    # fewer steps, a 3-point grid

Prints:
1. step time and throughput of the default model (default input size) and of the demo model/input, each fed
   (a) by the real cached ``tf.data`` pipeline (shuffle, augmentation, class weights) and (b) by one batch
   already in memory; the ratio b/a is the pipeline's efficiency (target >= 95 %);
2. on the demo data: ``train --find-lr`` vs. the best of a grid of fixed peak LRs (same schedule, epochs and
   seed), final validation accuracy side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from birdnet_stm32.config import Config  # noqa: E402
from birdnet_stm32.demo import demo_config  # noqa: E402


def time_steps(model, dataset, steps: int, warmup: int = 5) -> float:
    """Seconds per step of one ``model.fit`` over ``warmup + steps`` steps, timed after the first ``warmup``.

    One ``fit`` (one iterator) for both, so the timed steps do not include filling the shuffle and prefetch
    buffers of a fresh iterator, or tracing.
    """
    import keras

    class StepTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    timer = StepTimes()
    model.fit(dataset, epochs=1, steps_per_epoch=warmup + steps, verbose=0, shuffle=False, callbacks=[timer])
    return (timer.times[-1] - timer.times[warmup - 1]) / steps


def pipeline_overhead(name: str, cfg: Config, data_dir: Path, steps: int) -> dict:
    import tensorflow as tf

    from birdnet_stm32.data.dataset import prepare_datasets
    from birdnet_stm32.models import build_model
    from birdnet_stm32.training.trainer import _compile, _train_dataset, class_weights

    train_set, _ = prepare_datasets(data_dir, cfg.audio, cfg.data, seed=cfg.train.seed)
    real = _train_dataset(cfg, train_set, class_weights(train_set.y))
    batch = next(iter(real))
    in_memory = tf.data.Dataset.from_tensors(batch).repeat()
    model = build_model(cfg.audio, cfg.model, len(train_set.classes))
    _compile(model, cfg, 1e-3)
    t_mem = time_steps(model, in_memory, steps)
    t_real = time_steps(model, real, steps)
    bs = cfg.train.batch_size
    row = {"setup": name, "input": "x".join(map(str, model.input_shape[1:3])), "params": model.count_params(),
           "batch": bs, "s/step (pipeline)": t_real, "s/step (in memory)": t_mem,
           "examples/s (pipeline)": bs / t_real, "efficiency": t_mem / t_real}  # fmt: skip
    return row


def lr_comparison(data_dir: Path, work: Path, grid: list[float], epochs: int) -> list[tuple[str, float, float]]:
    from birdnet_stm32.training.trainer import train

    rows = []
    cfg = demo_config()
    cfg.train.epochs = epochs
    cfg.train.patience = 0
    t0 = time.perf_counter()
    found = train(cfg, data_dir, work / "find_lr")
    rows.append(("--find-lr", found.lr, max(r["val_accuracy"] for r in found.history), time.perf_counter() - t0))
    for lr in grid:
        cfg = demo_config()
        cfg.train.epochs, cfg.train.patience, cfg.train.find_lr, cfg.train.lr = epochs, 0, False, lr
        t0 = time.perf_counter()
        result = train(cfg, data_dir, work / f"lr_{lr:g}")
        rows.append((f"fixed {lr:g}", lr, max(r["val_accuracy"] for r in result.history), time.perf_counter() - t0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a 3-point LR grid")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--part", choices=["all", "pipeline", "lr"], default="all", help="which benchmark to run")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_training_"))
    os.environ.setdefault("BIRDNET_STM32_CACHE", str(work / "cache"))

    from birdnet_stm32.data.synthetic import DemoDataConfig, make_demo_dataset

    data_dir = work / "data"
    make_demo_dataset(data_dir, DemoDataConfig())
    if args.part in ("all", "pipeline"):
        pipeline_benchmark(data_dir, steps=5 if args.quick else 20)
    if args.part in ("all", "lr"):
        lr_benchmark(data_dir, work, args.quick)
    print(f"\nmachine: {os.cpu_count()} CPU cores; python {sys.version.split()[0]}; work folder {work}")


def pipeline_benchmark(data_dir: Path, steps: int) -> None:
    default = Config()
    default.train.batch_size = 32
    rows = [pipeline_overhead("default model, default input", default, data_dir, steps)]
    rows.append(pipeline_overhead("demo model, demo input", demo_config(), data_dir, steps * 4))
    print("\n## Step time and pipeline efficiency")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


def lr_benchmark(data_dir: Path, work: Path, quick: bool) -> None:
    grid = [1e-3, 1e-2, 1e-1] if quick else [float(10**e) for e in np.arange(-3.5, -0.49, 0.5)]
    epochs = 8 if quick else demo_config().train.epochs
    print(f"\n## --find-lr vs a grid of fixed peak LRs (demo data, {epochs} epochs, cosine schedule, seed 42)")
    print("| run | peak LR | best val accuracy | wall time (s) |\n|---|---|---|---|")
    for name, lr, acc, secs in lr_comparison(data_dir, work, grid, epochs):
        print(f"| {name} | {lr:.3g} | {acc:.3f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
