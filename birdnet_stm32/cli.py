"""The ``birdnet-stm32`` command line: one parser, one subcommand per pipeline stage.

Flag defaults and help texts come from the config dataclasses in
:mod:`birdnet_stm32.config`; flags that map onto a setting default to ``None``
here so that a value from ``--config FILE.yaml`` is only overridden by a flag the
user actually typed. TensorFlow is imported inside the command handlers, never
at module import, so ``birdnet-stm32 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from birdnet_stm32 import __version__
from birdnet_stm32.config import Config
from birdnet_stm32.errors import UserError

#: Flags that set a config value: flag -> dotted path in :class:`~birdnet_stm32.config.Config`.
SETTING_FLAGS: dict[str, str] = {
    "--epochs": "train.epochs",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--schedule": "train.schedule",
    "--optimizer": "train.optimizer",
    "--seed": "train.seed",
    "--strategy": "train.strategy",
    "--frontend": "audio.frontend",
    "--sample-rate": "audio.sample_rate",
    "--chunk-duration": "audio.chunk_duration",
    "--alpha": "model.alpha",
    "--min-lr": "train.lr_finder.min_lr",
    "--max-lr": "train.lr_finder.max_lr",
    "--num-steps": "train.lr_finder.num_steps",
    "--probe-steps": "train.lr_finder.probe_steps",
    "--workers": "data.workers",
    "--cache-dir": "data.cache_dir",
    "--calibration-samples": "export.calibration_samples",
}

#: Switches that set a boolean config value to a fixed value.
SWITCH_FLAGS: dict[str, tuple[str, bool]] = {
    "--find-lr": ("train.find_lr", True),
    "--per-tensor": ("export.per_channel", False),
    "--int8-io": ("export.int8_io", True),
    "--strict": ("export.strict", True),
}

TRAIN_FLAGS = [
    "--epochs",
    "--batch-size",
    "--lr",
    "--schedule",
    "--optimizer",
    "--frontend",
    "--seed",
    "--strategy",
    "--sample-rate",
    "--chunk-duration",
    "--alpha",
    "--min-lr",
    "--max-lr",
    "--num-steps",
    "--probe-steps",
    "--workers",
    "--cache-dir",
]
FIND_LR_FLAGS = [
    "--batch-size",
    "--optimizer",
    "--frontend",
    "--seed",
    "--strategy",
    "--min-lr",
    "--max-lr",
    "--num-steps",
    "--probe-steps",
    "--sample-rate",
    "--chunk-duration",
    "--alpha",
    "--workers",
    "--cache-dir",
]
EXPORT_FLAGS = ["--calibration-samples", "--workers", "--cache-dir"]


def setting_help(path: str) -> tuple[Any, str, type]:
    """Return the default, the help text and the type of a config setting.

    The help text is the setting's entry in its dataclass's ``Args:`` docstring
    section, so the CLI never retypes documentation.

    Args:
        path: Dotted path such as ``"train.epochs"``.

    Returns:
        ``(default, help_text, python_type)``.

    Examples:
        >>> default, text, kind = setting_help("train.epochs")
        >>> default, kind.__name__
        (30, 'int')
    """
    obj: Any = Config()
    *parents, name = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    default = getattr(obj, name)
    return default, _docstring_args(type(obj)).get(name, ""), type(default)


def _docstring_args(cls: type) -> dict[str, str]:
    doc = inspect.getdoc(cls) or ""
    args: dict[str, str] = {}
    current = None
    in_args = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if in_args:
            if line and not line.startswith(" "):
                break
            stripped = line.strip()
            if line.startswith("    ") and not line.startswith("        ") and ":" in stripped:
                current, text = stripped.split(":", 1)
                args[current] = text.strip()
            elif current and stripped:
                args[current] += " " + stripped
    return args


def _add_setting_flags(parser: argparse.ArgumentParser, flags: Sequence[str]) -> None:
    group = parser.add_argument_group("settings (override --config)")
    for flag in flags:
        if flag in SWITCH_FLAGS:
            path, value = SWITCH_FLAGS[flag]
            _, text, _ = setting_help(path)
            text = f"{text} This switch sets {path}: {str(value).lower()}.".replace("%", "%%")
            group.add_argument(flag, dest=flag, action="store_const", const=value, default=None, help=text)
            continue
        path = SETTING_FLAGS[flag]
        default, text, kind = setting_help(path)
        shown = "" if default in ("", 0.0) and kind is not int else f" (default: {default})"
        group.add_argument(
            flag,
            dest=flag,
            type=kind,
            default=None,
            metavar=kind.__name__.upper(),
            help=f"{text}{shown}".replace("%", "%%"),
        )


def build_config(args: argparse.Namespace) -> Config:
    """Combine defaults, ``--config FILE.yaml`` and typed flags into one validated config.

    Args:
        args: Parsed arguments of a subcommand.

    Returns:
        The effective, validated :class:`~birdnet_stm32.config.Config`.

    Raises:
        UserError: The config file or a flag value is invalid.
    """
    config_file = getattr(args, "config", None)
    cfg = Config.load(config_file) if config_file else Config()
    for flag, value in vars(args).items():
        if value is None or not flag.startswith("--"):
            continue
        path = SETTING_FLAGS.get(flag) or SWITCH_FLAGS[flag][0]
        obj: Any = cfg
        *parents, name = path.split(".")
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, name, value)
    return cfg.validate()


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``birdnet-stm32`` with all subcommands.

    Returns:
        The parser; ``parse_args`` gives a namespace whose ``handler`` runs the command.
    """
    parser = argparse.ArgumentParser(
        prog="birdnet-stm32",
        description="Train bird-sound classifiers for the STM32N6 NPU: data -> DS-CNN -> int8 TFLite.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings, errors and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "make-demo-data",
        help="write a synthetic bird-call dataset in class folders",
        description="Write a deterministic synthetic bird-call dataset as WAV files in class folders.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (DIR/<species>/*.wav)")
    p.add_argument("--clips-per-class", type=int, default=None, help="recordings per class (default: generator's)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: generator's)")
    p.add_argument("--no-noise-class", action="store_true", help="do not write the noise-only class")
    p.set_defaults(handler=_cmd_make_demo_data)

    p = sub.add_parser(
        "find-lr",
        help="run the LR range test only",
        description="Run the learning-rate range test on a dataset with the configured model.",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset root (DIR/<class>/<audio files>)")
    p.add_argument("--out", required=True, type=Path, help="folder for lr_finder.csv/.json/.png")
    p.add_argument("--config", type=Path, help="YAML config file (e.g. a run's config.yaml)")
    _add_setting_flags(p, FIND_LR_FLAGS)
    p.set_defaults(handler=_cmd_find_lr)

    p = sub.add_parser("train", help="train a model", description="Train a DS-CNN on DIR/<class>/<audio files>.")
    p.add_argument("--data", type=Path, help="dataset root (DIR/<class>/<audio files>)")
    p.add_argument("--val-data", type=Path, help="validation dataset root (overrides the split)")
    p.add_argument("--out", type=Path, help="run folder for the checkpoint and reports")
    p.add_argument("--config", type=Path, help="YAML config file (e.g. a run's config.yaml)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run from its folder")
    _add_setting_flags(p, ["--find-lr", *TRAIN_FLAGS])
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser(
        "export",
        help="quantize a run to int8 TFLite for STM32N6",
        description="Full-integer post-training quantization of a run's model.keras.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder written by 'train'")
    p.add_argument("--data", type=Path, help="dataset root for calibration/validation (default: the run's)")
    p.add_argument("--out", type=Path, help="output .tflite path (default: RUN/model_int8.tflite)")
    p.add_argument("--config", type=Path, help="YAML config whose export section applies (default: RUN/config.yaml)")
    _add_setting_flags(p, ["--per-tensor", "--int8-io", "--strict", *EXPORT_FLAGS])
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser(
        "evaluate",
        help="metrics for a .keras run or a .tflite file",
        description="Chunk- and file-level metrics for a run folder, a .keras or a .tflite model.",
    )
    p.add_argument("--model", required=True, type=Path, help="run folder, model.keras or a .tflite file")
    p.add_argument("--data", required=True, type=Path, help="dataset root (DIR/<class>/<audio files>)")
    p.add_argument("--out", type=Path, help="folder for eval_report.json and plots (default: the model's folder)")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size (default: 64)")
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on built-in synthetic data",
        description="Generate demo data, train with --find-lr, export to int8 and evaluate.",
    )
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's)")
    p.set_defaults(handler=_cmd_demo)
    return parser


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from birdnet_stm32.data.synthetic import DemoDataConfig, make_demo_dataset

    kwargs: dict[str, Any] = {}
    if args.clips_per_class is not None:
        kwargs["clips_per_class"] = args.clips_per_class
    if args.seed is not None:
        kwargs["seed"] = args.seed
    if args.no_noise_class:
        kwargs["noise_class"] = False
    summary = make_demo_dataset(args.out, DemoDataConfig(**kwargs))
    print(summary)
    return 0


def _cmd_find_lr(args: argparse.Namespace) -> int:
    from birdnet_stm32.training.trainer import run_find_lr

    result = run_find_lr(build_config(args), args.data, args.out)
    print(result.summary())
    return 0 if result.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from birdnet_stm32.training.trainer import train

    if args.resume is None:
        _require(args.data, "--data")
        _require(args.out, "--out")
    train(build_config(args), data_dir=args.data, out_dir=args.out, val_dir=args.val_data, resume=args.resume)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from birdnet_stm32.export.quantize import export_run

    if args.config is None and (args.run / "config.yaml").is_file():
        args.config = args.run / "config.yaml"
    cfg = build_config(args)
    report = export_run(
        args.run,
        cfg.export,
        data_dir=args.data,
        data_cfg=cfg.data,
        out_path=args.out,
        overrides={k: v for k, v in vars(args).items() if k.startswith("--") and v is not None},
    )
    return 0 if report["passed"] else 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from birdnet_stm32.evaluation.evaluate import evaluate_model

    evaluate_model(args.model, args.data, out_dir=args.out, batch_size=args.batch_size)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from birdnet_stm32.demo import run_demo

    run_demo(args.out, epochs=args.epochs)
    return 0


def _require(value: Any, flag: str) -> None:
    if value is None:
        raise UserError(f"{flag} is required")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``birdnet-stm32`` command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code: 0 on success, 1 when a check failed (for example a bad LR
        sweep or a failed export audit), 2 for a user error, 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserError as exc:
        print(f"birdnet-stm32 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"birdnet-stm32 {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["SETTING_FLAGS", "SWITCH_FLAGS", "build_config", "build_parser", "main", "setting_help"]
