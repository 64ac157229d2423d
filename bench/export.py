"""Export benchmark: int8 vs float fidelity on the demo run, per-channel vs per-tensor side by side.

    python bench/export.py --run demo_output/run     # an existing run (e.g. from `birdnet-stm32 demo`)
    python bench/export.py                           # trains the demo run first (a few minutes on 2 cores)

For each weight-quantization scheme it runs the real exporter (:func:`birdnet_stm32.export.quantize.export_run`)
into a temporary folder and prints: top-1 agreement (target >= 99 %), accuracy of the float and the int8 model
and the drop (target <= 1 point), cosine similarity, macro ROC-AUC and cmAP drops, file size, peak activation
estimate, conversion time, host int8 inference time per chunk, and the STM32N6 audit result with the op set.
Finally it quantizes the default-configuration model (random weights) and prints its audit and op set.
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

from birdnet_stm32.config import ExportConfig  # noqa: E402


def demo_run(out: Path) -> Path:
    """Generate the demo data and train the demo model into ``out`` (as ``birdnet-stm32 demo`` does)."""
    from birdnet_stm32.data.synthetic import DemoDataConfig, make_demo_dataset
    from birdnet_stm32.demo import demo_config
    from birdnet_stm32.training.trainer import train

    make_demo_dataset(out / "data", DemoDataConfig())
    train(demo_config(), data_dir=out / "data", out_dir=out / "run")
    return out / "run"


def invoke_ms(tflite_path: Path, x: np.ndarray, repeats: int = 50) -> float:
    """Milliseconds per chunk of the int8 model on this host (builtin kernels, one thread)."""
    from birdnet_stm32.export.tflite_model import TFLiteModel

    model = TFLiteModel(tflite_path, num_threads=1)
    model.predict(x[:5])
    chunk = x[np.arange(repeats) % len(x)]
    start = time.perf_counter()
    model.predict(chunk)
    return 1000 * (time.perf_counter() - start) / repeats


def default_model_audit() -> None:
    """Quantize the default-config model (random weights, random calibration) and print its audit."""
    from birdnet_stm32.config import Config
    from birdnet_stm32.export.audit import audit_tflite, format_audit
    from birdnet_stm32.export.quantize import quantize_model
    from birdnet_stm32.models import build_model, format_summary, model_summary

    cfg = Config()
    model = build_model(cfg.audio, cfg.model, 10)
    print(format_summary(model_summary(model)))
    x = np.random.default_rng(0).random((32, *model.input_shape[1:]), dtype=np.float32)
    start = time.perf_counter()
    tflite = quantize_model(model, x, cfg.export)
    print(f"conversion {time.perf_counter() - start:.1f} s")
    print(format_audit(audit_tflite(tflite)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder to export (default: train the demo run first)")
    parser.add_argument("--calibration-samples", type=int, default=ExportConfig().calibration_samples)
    args = parser.parse_args()

    from birdnet_stm32.data.dataset import prepare_datasets
    from birdnet_stm32.export.quantize import export_run
    from birdnet_stm32.run import open_run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = args.run or demo_run(tmp / "demo")
        opened = open_run(run)
        summary = opened.model_config.get("summary", {})
        data = opened.model_config["data"]
        _, val = prepare_datasets(data["train_dir"], opened.config.audio, opened.config.data,
                                  seed=opened.config.train.seed, val_dir=data.get("val_dir"))  # fmt: skip
        rows = {}
        for name, per_channel in (("per-channel", True), ("per-tensor", False)):
            # thresholds off: the benchmark measures, it does not gate
            cfg = ExportConfig(per_channel=per_channel, calibration_samples=args.calibration_samples,
                               min_cosine=-1.0, min_top1_agreement=0.0, max_accuracy_drop=1.0)  # fmt: skip
            out = tmp / name / "model_int8.tflite"
            rows[name] = (export_run(run, cfg, out_path=out), invoke_ms(out, val.x))

    f = {name: r["fidelity"] for name, (r, _) in rows.items()}
    print()
    print(f"Export benchmark on {run}  (model: {summary.get('params', '?')} params, "
          f"{summary.get('macs', 0) / 1e6:.1f} M MACs; {f['per-channel']['examples']} validation chunks)")  # fmt: skip
    table = [
        ("top-1 agreement (%)", lambda r, m: f"{100 * r['fidelity']['top1_agreement']:.2f}"),
        ("  ... on chunks with a species", lambda r, m: f"{100 * r['fidelity']['top1_agreement_labeled']:.2f}"),
        ("accuracy float", lambda r, m: f"{r['fidelity']['metrics']['accuracy']['keras']:.4f}"),
        ("accuracy int8", lambda r, m: f"{r['fidelity']['metrics']['accuracy']['tflite']:.4f}"),
        ("accuracy drop (points)", lambda r, m: f"{-100 * r['fidelity']['metrics']['accuracy']['diff']:.2f}"),
        ("macro ROC-AUC drop", lambda r, m: f"{-r['fidelity']['metrics']['macro_roc_auc']['diff']:.4f}"),
        ("cmAP drop", lambda r, m: f"{-r['fidelity']['metrics']['cmap']['diff']:.4f}"),
        ("cosine mean", lambda r, m: f"{r['fidelity']['cosine_mean']:.4f}"),
        ("cosine p05", lambda r, m: f"{r['fidelity']['cosine_p05']:.4f}"),
        ("max |diff|", lambda r, m: f"{r['fidelity']['max_abs_diff']:.4f}"),
        ("file size (KiB)", lambda r, m: f"{r['tflite']['size_bytes'] / 1024:.1f}"),
        ("peak activations (KiB)", lambda r, m: f"{r['tflite']['peak_activation_bytes'] / 1024:.1f}"),
        ("conversion time (s)", lambda r, m: f"{r['conversion_seconds']:.1f}"),
        ("host int8 invoke (ms/chunk)", lambda r, m: f"{m:.2f}"),
        ("STM32N6 audit problems", lambda r, m: str(len(r["audit"]["problems"]))),
    ]
    print(f"{'':<30}{'per-channel':>14}{'per-tensor':>14}")
    for label, fn in table:
        print(f"{label:<30}" + "".join(f"{fn(*rows[name]):>14}" for name in ("per-channel", "per-tensor")))
    ops = rows["per-channel"][0]["tflite"]["op_counts"]
    print("op set: " + ", ".join(f"{op} x{n}" for op, n in ops.items()))
    print()
    print("Default configuration (frontend hybrid 257x256, alpha 1, depth 2, 10 classes):")
    default_model_audit()


if __name__ == "__main__":
    main()
