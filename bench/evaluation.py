"""Evaluation benchmark: cost of the metrics, pooling and plot, and inference speed of .keras vs .tflite.

Usage: python bench/evaluation.py [--chunks 20000] [--classes 50] [--inference-chunks 64]

Prints:
* compute_metrics (accuracy, per-class ROC-AUC and AP) on a chunks x classes score matrix, against the same
  numbers from scikit-learn (time and the largest difference);
* pool_by_group for each pooling method (chunks -> files of 10 chunks);
* plot_confusion_matrix at the given number of classes;
* scoring speed per chunk of the default-config DS-CNN as Keras (batch 64) and as float TFLite (batch 1,
  builtin kernels), i.e. what `birdnet-stm32 evaluate` spends per chunk on this machine.
"""

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_metrics(n, c):
    from sklearn import metrics as skm

    from birdnet_stm32.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(0)
    y = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
    y[: n // 20] = 0  # 5% noise chunks
    logits = 2.0 * y + rng.normal(size=(n, c))
    p = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    labels = [f"class_{i}" for i in range(c)]

    t_ours, ours = timed(lambda: compute_metrics(y, p, labels))

    def sklearn_numbers():
        lab = y.any(1)
        return (
            skm.accuracy_score(y[lab].argmax(1), p[lab].argmax(1)),
            skm.roc_auc_score(y, p, average=None),
            skm.average_precision_score(y, p, average=None),
        )

    t_sk, (acc, auc, ap) = timed(sklearn_numbers)
    diff = max(
        abs(ours["accuracy"] - acc),
        max(abs(ours["per_class"][lab]["roc_auc"] - auc[i]) for i, lab in enumerate(labels)),
        max(abs(ours["per_class"][lab]["ap"] - ap[i]) for i, lab in enumerate(labels)),
    )
    print(f"compute_metrics {n} x {c}: {t_ours * 1e3:.0f} ms (scikit-learn, same numbers: {t_sk * 1e3:.0f} ms); "
          f"max |difference| {diff:.1e}")  # fmt: skip
    return p


def bench_pooling(p):
    from birdnet_stm32.evaluation.pooling import METHODS, pool_by_group

    groups = np.arange(len(p)) // 10
    for method in METHODS:
        t, _ = timed(lambda m=method: pool_by_group(p, groups, m))
        print(f"pool_by_group {method:<4} {len(p)} chunks -> {groups[-1] + 1} files: {t * 1e3:.1f} ms")


def bench_plot(p, c):
    from birdnet_stm32.evaluation.metrics import confusion_matrix
    from birdnet_stm32.evaluation.plots import plot_confusion_matrix

    y = np.eye(c)[p.argmax(1)]
    counts = confusion_matrix(y, p, c, noise_row=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cm.png"
        t, _ = timed(lambda: plot_confusion_matrix(counts, [f"Genus_species_{i:02d}" for i in range(c)], out), 1)
        print(f"plot_confusion_matrix {c} classes: {t:.2f} s, {out.stat().st_size / 1e3:.0f} kB")


def bench_inference(n):
    import tensorflow as tf

    from birdnet_stm32.config import Config
    from birdnet_stm32.export.tflite_model import TFLiteModel
    from birdnet_stm32.models import build_model

    cfg = Config()
    model = build_model(cfg.audio, cfg.model, num_classes=10)
    shape = model.input_shape[1:]
    x = np.random.default_rng(0).random((n, *shape), dtype=np.float32) * 0.1
    with contextlib.redirect_stdout(io.StringIO()):
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    tflite = TFLiteModel(flatbuffer)

    def keras_scores():  # what evaluate does: predict_on_batch over batches of 64
        return np.concatenate([model.predict_on_batch(x[i : i + 64]) for i in range(0, n, 64)])

    keras_scores()  # warm-up (tf.function tracing)
    t_keras, k = timed(keras_scores, 1)
    t_tflite, t = timed(lambda: tflite.predict(x), 1)
    print(f"default model (input {shape}, {model.count_params()} params), {n} chunks: "
          f"keras {t_keras / n * 1e3:.1f} ms/chunk, float tflite {t_tflite / n * 1e3:.1f} ms/chunk; "
          f"max |score difference| {np.abs(k - t).max():.1e}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--inference-chunks", type=int, default=64)
    args = parser.parse_args()
    p = bench_metrics(args.chunks, args.classes)
    bench_pooling(p)
    bench_plot(p, args.classes)
    bench_inference(args.inference_chunks)


if __name__ == "__main__":
    main()
