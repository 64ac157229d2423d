"""Data-pipeline benchmark: feature extraction throughput, cached-epoch cost, tf.data cost vs. a training step.

Prints:
  1. feature extraction throughput (recordings/s and chunks/s) with 1 and 2 worker processes (cold cache);
  2. the cost of reading one epoch's features from a warm cache (no audio decoded);
  3. the per-batch cost of the training tf.data pipeline (gather + augmentation) on its own;
  4. the default model's training step time, with batches from that pipeline and from a constant tensor,
     and the overhead of the data loading in percent of the step time.

Usage:
    .venv/bin/python bench/data_pipeline.py [--data DIR] [--files N] [--steps N]

Without --data, the default synthetic demo dataset is generated into a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def extraction(index, audio_cfg, workers: int, cache_dir: Path) -> tuple[float, int]:
    from birdnet_stm32.config import DataConfig
    from birdnet_stm32.data.dataset import load_features

    cfg = DataConfig(cache_dir=str(cache_dir), workers=workers)
    t0 = time.perf_counter()
    feats = load_features(index, audio_cfg, cfg, progress=False)
    return time.perf_counter() - t0, len(feats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="dataset root (default: generate the demo dataset)")
    parser.add_argument("--files", type=int, default=350, help="recordings used for the extraction timing")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    from birdnet_stm32.config import AudioConfig, DataConfig, ModelConfig
    from birdnet_stm32.data.dataset import discover, load_features
    from birdnet_stm32.data.synthetic import make_demo_dataset

    data_dir = args.data
    if data_dir is None:
        data_dir = tmp / "demo"
        summary = make_demo_dataset(data_dir)
        print(f"demo data: {summary.files} files, {summary.seconds:.0f} s of audio, generated in "
              f"{summary.wall_time:.1f} s")  # fmt: skip
    audio_cfg = AudioConfig()  # defaults: hybrid frontend, 257 x 256 inputs
    index = discover(data_dir)
    step = max(1, len(index) // args.files)
    subset = index.subset(list(range(0, len(index), step))[: args.files])
    audio_seconds = sum(_duration(p) for p in subset.files)
    print(f"\n[1] feature extraction, cold cache, {len(subset)} recordings ({audio_seconds:.0f} s of audio), "
          f"frontend={audio_cfg.frontend}, cpu_count={os.cpu_count()}")  # fmt: skip
    for workers in (1, 2):
        seconds, chunks = extraction(subset, audio_cfg, workers, tmp / f"cache_w{workers}")
        print(f"    workers={workers}: {seconds:6.2f} s  {len(subset) / seconds:6.1f} recordings/s  "
              f"{chunks / seconds:6.1f} chunks/s  ({audio_seconds / seconds:5.0f}x real time)")  # fmt: skip

    cache = tmp / "cache_full"
    data_cfg = DataConfig(cache_dir=str(cache))
    load_features(index, audio_cfg, data_cfg, progress=False)
    t0 = time.perf_counter()
    feats = load_features(index, audio_cfg, data_cfg, progress=False)
    cached = time.perf_counter() - t0
    megabytes = feats.x.nbytes / 2**20
    print(f"\n[2] cached epoch: {len(index)} recordings / {len(feats)} chunks read from the cache in {cached:.2f} s "
          f"({megabytes:.0f} MB of float32 features, {megabytes / cached:.0f} MB/s)")  # fmt: skip

    import keras
    import tensorflow as tf

    from birdnet_stm32.data.dataset import make_tf_dataset

    batch = 32
    ds = make_tf_dataset(feats, batch, training=True, data_cfg=data_cfg, seed=0)
    iterator = iter(ds)
    for _ in range(5):
        next(iterator)
    n_batches = 60
    c0, t0 = os.times(), time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    c1, t1 = os.times(), time.perf_counter()
    per_batch = (t1 - t0) / n_batches
    per_batch_cpu = (c1.user + c1.system - c0.user - c0.system) / n_batches
    print(f"\n[3] training tf.data pipeline alone (gather + gain + mixup + masks, batch {batch}): "
          f"{per_batch * 1000:.1f} ms/batch wall, {per_batch_cpu * 1000:.1f} ms/batch CPU")  # fmt: skip

    from birdnet_stm32.models import build_model

    model = build_model(audio_cfg, ModelConfig(), len(feats.classes))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    x0, y0 = next(iterator)
    del iterator  # an idle iterator keeps its prefetch threads
    constant = tf.data.Dataset.from_tensors((x0, y0)).repeat()
    model.fit(constant, steps_per_epoch=2, epochs=1, verbose=0)  # build + trace
    model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)

    def timed(dataset) -> tuple[float, float]:
        """Wall-clock and process CPU seconds per step (CPU time is robust to other processes' load)."""
        c0, t0 = os.times(), time.perf_counter()
        model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0)
        c1, t1 = os.times(), time.perf_counter()
        return (t1 - t0) / args.steps, (c1.user + c1.system - c0.user - c0.system) / args.steps

    # alternate the two variants so a change in machine load hits both alike; report medians
    results: dict[str, list[tuple[float, float]]] = {"constant": [], "pipeline": []}
    for r in range(args.rounds):
        order = [("constant", constant), ("pipeline", ds)]
        for name, dataset in order if r % 2 == 0 else order[::-1]:
            results[name].append(timed(dataset))
        print(f"    round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.3f} s/step wall, {v[-1][1]:.3f} s/step CPU"
                                                 for k, v in results.items()))  # fmt: skip
    wall = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    print(f"\n[4] default model ({model.count_params():,} params, input {tuple(model.input_shape[1:])}), "
          f"batch {batch}, {args.rounds} alternating rounds of {args.steps} steps, medians:")  # fmt: skip
    for name in ("constant", "pipeline"):
        print(f"    {name:9s} batches: {wall[name]:.3f} s/step wall, {cpu[name]:.3f} s/step CPU")
    print(f"    data loading adds {(wall['pipeline'] / wall['constant'] - 1) * 100:+.1f} % wall time, "
          f"{(cpu['pipeline'] / cpu['constant'] - 1) * 100:+.1f} % CPU time per step")  # fmt: skip
    print(f"    pipeline alone ([3]) / constant step: {per_batch / wall['constant'] * 100:.1f} % wall, "
          f"{per_batch_cpu / cpu['constant'] * 100:.1f} % CPU")  # fmt: skip


def _duration(path: Path) -> float:
    import soundfile as sf

    info = sf.info(path)
    return info.frames / info.samplerate


if __name__ == "__main__":
    main()
