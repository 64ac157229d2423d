"""The run folder: what ``train`` writes and ``export``/``evaluate`` read.

A run folder holds::

    model.keras          best checkpoint (Keras safe-mode loadable)
    model_config.json    versioned description the MCU side and the exporter need
    labels.txt           one class name per line, in output order
    config.yaml          the effective config; ``--config RUN/config.yaml`` reproduces the run
    history.csv          per-epoch metrics and learning rate
    curves.png           training curves
    lr_finder.*          with ``--find-lr``: the sweep (csv, json, png)
    model_int8.tflite    after ``export``, with export_report.json

``model_config.json`` carries ``schema_version``; :func:`load_model_config` refuses
versions it does not know instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birdnet_stm32.config import Config
from birdnet_stm32.errors import UserError
from birdnet_stm32.utils import atomic_write_text

#: Version of the ``model_config.json`` layout written by this package.
SCHEMA_VERSION = 1

MODEL_FILE = "model.keras"
MODEL_CONFIG_FILE = "model_config.json"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.yaml"
TFLITE_FILE = "model_int8.tflite"


def save_model_config(run_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write ``model_config.json`` (atomically), stamping the schema version.

    Args:
        run_dir: The run folder.
        info: Content: at least ``labels``, ``audio``, ``frontend`` and ``model`` sections.

    Returns:
        Path of the written file.
    """
    from birdnet_stm32 import __version__

    data = {"schema_version": SCHEMA_VERSION, "birdnet_stm32_version": __version__, **info}
    return atomic_write_text(Path(run_dir) / MODEL_CONFIG_FILE, json.dumps(data, indent=2, default=_jsonable))


def load_model_config(run_dir: str | Path) -> dict[str, Any]:
    """Read and check a run's ``model_config.json``.

    Args:
        run_dir: The run folder.

    Returns:
        The parsed content.

    Raises:
        UserError: The folder or file is missing, unreadable, or has an unknown schema version.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder does not exist")
    path = run_dir / MODEL_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a training run (no {MODEL_CONFIG_FILE}); train one with 'birdnet-stm32 train'")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path}: schema_version {version!r} is not supported (this birdnet-stm32 reads version {SCHEMA_VERSION})"
        )
    return data


@dataclass
class Run:
    """A trained run folder, opened.

    Args:
        path: The run folder.
        model_config: Content of ``model_config.json``.
        config: The effective :class:`~birdnet_stm32.config.Config` of the run.
        labels: Class names in output order.
    """

    path: Path
    model_config: dict[str, Any]
    config: Config
    labels: list[str]

    @property
    def model_path(self) -> Path:
        """Path of the Keras checkpoint."""
        return self.path / MODEL_FILE

    def load_model(self) -> Any:
        """Load ``model.keras`` for inference (not compiled) with Keras safe mode on.

        Returns:
            The Keras model.

        Raises:
            UserError: The checkpoint is missing.
        """
        if not self.model_path.is_file():
            raise UserError(f"{self.path}: no {MODEL_FILE} in the run folder")
        import keras

        import birdnet_stm32.models  # noqa: F401  (registers the custom layers)

        return keras.saving.load_model(self.model_path, compile=False, safe_mode=True)


def open_run(run_dir: str | Path) -> Run:
    """Open a run folder written by ``train``.

    Args:
        run_dir: The run folder.

    Returns:
        The opened :class:`Run`.

    Raises:
        UserError: The folder is not a complete run.
    """
    run_dir = Path(run_dir)
    model_config = load_model_config(run_dir)
    config_path = run_dir / CONFIG_FILE
    config = (
        Config.load(config_path)
        if config_path.is_file()
        else Config.from_dict(
            {k: model_config[k] for k in ("audio", "model") if k in model_config and isinstance(model_config[k], dict)}
        )
    )
    labels = list(model_config.get("labels") or [])
    if not labels:
        raise UserError(f"{run_dir / MODEL_CONFIG_FILE}: has no labels")
    return Run(path=run_dir, model_config=model_config, config=config, labels=labels)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
