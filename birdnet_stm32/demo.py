"""``birdnet-stm32 demo``: the whole pipeline on built-in synthetic data, sized for a laptop CPU.

Steps, all through the same functions as the CLI commands:

1. ``make-demo-data`` twice: a training set and an independent test set (another seed);
2. ``train --find-lr`` with :func:`demo_config` (a small input and model, so it runs in minutes);
3. ``export`` to int8 TFLite with the STM32N6 audit and fidelity report;
4. ``evaluate`` the int8 model on the test set;
5. a summary table with the found LR, epochs, accuracies, file sizes and the plots' paths.
"""

from __future__ import annotations

import time
from pathlib import Path

from birdnet_stm32.config import Config

#: Seed of the demo's independent test set (the training set uses the generator's default seed).
TEST_SET_SEED = 1234


def demo_config() -> Config:
    """The demo's settings: the defaults, with a smaller input and model and a short run.

    Returns:
        A validated :class:`~birdnet_stm32.config.Config`.
    """
    return Config.from_dict(
        {
            "audio": {"n_fft": 256, "spec_width": 128, "n_mels": 40, "fmax": 11025.0},
            "model": {"alpha": 0.5},
            "train": {
                "epochs": 25,
                "batch_size": 32,
                "find_lr": True,
                "patience": 8,
            },
            "export": {"calibration_samples": 200},
        },
        source="demo",
    ).validate()


def run_demo(out_dir: str | Path = "demo_output", epochs: int | None = None) -> dict:
    """Run the whole pipeline on synthetic data and print a summary.

    Args:
        out_dir: Output folder: ``data/``, ``test_data/`` and ``run/`` are created in it.
        epochs: Override the demo's number of epochs.

    Returns:
        The summary values (found LR, epochs, accuracies, paths).
    """
    from birdnet_stm32.data.synthetic import DemoDataConfig, make_demo_dataset
    from birdnet_stm32.evaluation.evaluate import evaluate_model
    from birdnet_stm32.export.quantize import export_run
    from birdnet_stm32.training.trainer import train

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    data_dir, test_dir, run_dir = out_dir / "data", out_dir / "test_data", out_dir / "run"
    print(make_demo_dataset(data_dir, DemoDataConfig()))
    test_cfg = DemoDataConfig(seed=TEST_SET_SEED, clips_per_class=max(DemoDataConfig().clips_per_class // 3, 5))
    print(make_demo_dataset(test_dir, test_cfg))

    cfg = demo_config()
    if epochs is not None:
        cfg.train.epochs = epochs
    result = train(cfg, data_dir=data_dir, out_dir=run_dir)
    report = export_run(run_dir, cfg.export)
    tflite = run_dir / "model_int8.tflite"
    if not report["passed"]:  # the exporter wrote no model: evaluate the float model instead
        print(f"Export did not pass its checks (see {run_dir / 'export_report.json'}); evaluating model.keras")
    evaluation = evaluate_model(tflite if report["passed"] else run_dir, test_dir)

    rows = [
        ("found LR (schedule peak)", f"{result.found_lr:.3g}" if result.found_lr else "-"),
        ("epochs (best)", f"{result.epochs} ({result.best_epoch})"),
        ("val accuracy, float model", f"{result.val_accuracy:.3f}"),
        (f"test accuracy, {'int8' if report['passed'] else 'float'} model", f"{evaluation['accuracy']:.3f}"),
        ("export checks", "passed" if report["passed"] else "FAILED"),
        ("model.keras", _size(run_dir / "model.keras")),
        ("model_int8.tflite", _size(tflite)),
        ("wall time", f"{time.perf_counter() - t0:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nDemo summary\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    plots = sorted(run_dir.glob("*.png"))
    print("Plots:\n" + "\n".join(f"  {p}" for p in plots))
    return {
        "found_lr": result.found_lr,
        "epochs": result.epochs,
        "val_accuracy": result.val_accuracy,
        "test_accuracy": evaluation["accuracy"],
        "export_passed": report["passed"],
        "run_dir": str(run_dir),
    }


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1024:.1f} KiB" if path.exists() else "missing"
