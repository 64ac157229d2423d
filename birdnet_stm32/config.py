"""Settings for every stage of the pipeline, as dataclasses with YAML in and out.

This module is the one place where defaults live. The CLI flags, the
``config.yaml`` written into each run and the documentation are generated from
(or checked against) these dataclasses; nothing retypes a default.

A full configuration is a :class:`Config` with one section per stage::

    audio:  sample rate, chunking, silence rule, spectrogram settings
    data:   split, cache, workers, augmentation
    model:  DS-CNN knobs
    train:  optimizer, schedule, LR finder, epochs, seed, strategy
    export: quantization and fidelity thresholds

Precedence when a run is configured: dataclass defaults < ``--config FILE.yaml``
< command-line flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from birdnet_stm32.errors import UserError

#: Learning rate used when neither ``--lr`` nor ``--find-lr`` is given (peak LR of the schedule).
DEFAULT_LR = 1e-3


@dataclass
class AudioConfig:
    """How recordings become fixed-size model inputs.

    Args:
        sample_rate: Sample rate in Hz that every recording is resampled to.
        chunk_duration: Length of one model input in seconds.
        chunk_overlap: Overlap between consecutive chunks in seconds (``0 <= overlap < chunk_duration``).
        silence_db: Chunks whose RMS level is more than this many dB below the loudest chunk of
            the same recording are dropped as silence (at least one chunk per file is kept; 0 keeps all).
        frontend: ``"mel"`` (host computes a mel spectrogram) or ``"hybrid"`` (host computes a
            linear STFT magnitude; the mel projection is a trainable layer in the model).
        n_fft: FFT size in samples (also the Hann window length).
        spec_width: Number of STFT frames per chunk; the hop is derived so a chunk gives exactly
            this many frames (hop = (chunk_samples - n_fft) // (spec_width - 1)).
        n_mels: Number of mel bands.
        fmin: Lowest mel band edge in Hz.
        fmax: Highest mel band edge in Hz (at most ``sample_rate / 2``).
        mag_scale: Magnitude compression: ``"pwl"`` (in-graph piecewise-linear), ``"db"``
            (host-side decibels) or ``"none"``.
    """

    sample_rate: int = 22050
    chunk_duration: float = 3.0
    chunk_overlap: float = 0.0
    silence_db: float = 40.0
    frontend: str = "hybrid"
    n_fft: int = 512
    spec_width: int = 256
    n_mels: int = 64
    fmin: float = 150.0
    fmax: float = 11025.0
    mag_scale: str = "pwl"

    def validate(self) -> None:
        """Check the settings against each other.

        Raises:
            UserError: A setting is out of range, naming it.
        """
        _check(self.sample_rate >= 4000, f"audio.sample_rate={self.sample_rate}: must be >= 4000 Hz")
        _check(self.chunk_duration > 0, f"audio.chunk_duration={self.chunk_duration}: must be > 0 s")
        _check(
            0 <= self.chunk_overlap < self.chunk_duration,
            f"audio.chunk_overlap={self.chunk_overlap}: must be >= 0 and < chunk_duration ({self.chunk_duration})",
        )
        _check(self.silence_db >= 0, f"audio.silence_db={self.silence_db}: must be >= 0 dB (0 keeps every chunk)")
        _check(self.frontend in ("mel", "hybrid"), f"audio.frontend={self.frontend!r}: choose 'mel' or 'hybrid'")
        _check(self.mag_scale in ("pwl", "db", "none"), f"audio.mag_scale={self.mag_scale!r}: choose pwl, db or none")
        _check(
            self.n_fft >= 64 and self.n_fft & (self.n_fft - 1) == 0,
            f"audio.n_fft={self.n_fft}: must be a power of two >= 64",
        )
        _check(self.spec_width >= 8, f"audio.spec_width={self.spec_width}: must be >= 8 frames")
        _check(self.n_mels >= 8, f"audio.n_mels={self.n_mels}: must be >= 8")
        _check(0 <= self.fmin < self.fmax, f"audio.fmin={self.fmin}: must be >= 0 and below fmax ({self.fmax})")
        _check(
            self.fmax <= self.sample_rate / 2,
            f"audio.fmax={self.fmax}: must not exceed half the sample rate ({self.sample_rate / 2:g} Hz)",
        )
        _check(
            self.chunk_samples >= self.n_fft,
            f"audio.chunk_duration={self.chunk_duration}: a chunk must hold at least n_fft={self.n_fft} samples",
        )
        _check(
            self.chunk_samples >= self.n_fft + self.spec_width - 1,
            f"audio.spec_width={self.spec_width}: too many frames for a chunk of {self.chunk_samples} samples",
        )

    @property
    def chunk_samples(self) -> int:
        """Number of samples in one chunk."""
        return int(round(self.chunk_duration * self.sample_rate))


@dataclass
class DataConfig:
    """How the dataset is split, cached and augmented.

    Args:
        val_fraction: Fraction of each class's recordings held out for validation (grouped by recording).
        cache_dir: Folder for the feature cache; empty means ``~/.cache/birdnet_stm32``
            (or ``$BIRDNET_STM32_CACHE``).
        workers: Worker processes for feature extraction; 0 means one per CPU core.
        max_files_per_class: Use at most this many recordings per class (0 = all).
        mixup_alpha: Mixup Beta(alpha, alpha) parameter; 0 turns mixup off.
        time_masks: Number of SpecAugment time masks per example (0 = off).
        freq_masks: Number of SpecAugment frequency masks per example (0 = off).
        max_mask_fraction: Largest mask width as a fraction of the axis length.
        gain_db: Random gain range in dB (uniform in ``[-gain_db, +gain_db]``; 0 = off).
    """

    val_fraction: float = 0.2
    cache_dir: str = ""
    workers: int = 0
    max_files_per_class: int = 0
    mixup_alpha: float = 0.2
    time_masks: int = 2
    freq_masks: int = 2
    max_mask_fraction: float = 0.1
    gain_db: float = 6.0

    def validate(self) -> None:
        """Check the settings.

        Raises:
            UserError: A setting is out of range, naming it.
        """
        _check(0 < self.val_fraction < 1, f"data.val_fraction={self.val_fraction}: must be between 0 and 1")
        _check(self.workers >= 0, f"data.workers={self.workers}: must be >= 0")
        _check(self.mixup_alpha >= 0, f"data.mixup_alpha={self.mixup_alpha}: must be >= 0")
        _check(0 <= self.max_mask_fraction < 1, f"data.max_mask_fraction={self.max_mask_fraction}: must be in [0, 1)")
        _check(self.max_files_per_class >= 0, f"data.max_files_per_class={self.max_files_per_class}: must be >= 0")
        _check(self.time_masks >= 0, f"data.time_masks={self.time_masks}: must be >= 0")
        _check(self.freq_masks >= 0, f"data.freq_masks={self.freq_masks}: must be >= 0")
        _check(self.gain_db >= 0, f"data.gain_db={self.gain_db}: must be >= 0 dB")


@dataclass
class ModelConfig:
    """DS-CNN architecture knobs.

    Args:
        alpha: Width multiplier applied to every layer's channel count (rounded to multiples of 8).
        depth: Blocks per stage: the first downsamples, the others keep the resolution (with skip
            connections when ``residual``).
        se: Add squeeze-and-excitation (as 1x1 convolutions) to each block.
        residual: Use inverted-residual blocks (expand, depthwise, project, skip).
        dropout: Dropout rate before the classification head.
        frontend_trainable: Train the mel projection of the ``hybrid`` frontend.
        multi_label: Sigmoid outputs and binary cross-entropy instead of softmax.
        bn_momentum: BatchNormalization momentum of the moving statistics. 0.9 (not Keras' 0.99) so
            inference statistics settle within a few hundred steps, as small field datasets need.
        pwl_max_input: Input magnitude (host feature units) at which the in-graph piecewise-linear
            compression saturates; its breakpoints are octaves below it.
    """

    alpha: float = 1.0
    depth: int = 2
    se: bool = True
    residual: bool = True
    dropout: float = 0.3
    frontend_trainable: bool = True
    multi_label: bool = False
    bn_momentum: float = 0.9
    pwl_max_input: float = 1.0

    def validate(self) -> None:
        """Check the settings.

        Raises:
            UserError: A setting is out of range, naming it.
        """
        _check(self.alpha > 0, f"model.alpha={self.alpha}: must be > 0")
        _check(self.depth >= 1, f"model.depth={self.depth}: must be >= 1")
        _check(0 <= self.dropout < 1, f"model.dropout={self.dropout}: must be in [0, 1)")
        _check(0 < self.bn_momentum < 1, f"model.bn_momentum={self.bn_momentum}: must be in (0, 1)")
        _check(self.pwl_max_input > 0, f"model.pwl_max_input={self.pwl_max_input}: must be > 0")


@dataclass
class LRFinderConfig:
    """Settings of the LR range test run by ``--find-lr`` and ``find-lr``.

    Args:
        min_lr: First learning rate of the sweep (> 0).
        max_lr: Last learning rate of the sweep (> min_lr).
        num_steps: Number of optimizer steps in the sweep (>= 10).
        smoothing: Span in steps of the bias-corrected EMA that smooths the per-step loss.
        probe_steps: Steps of each constant-LR probe that picks the recommended constant LR (``0``: off, the
            ``valley`` suggestion). Run by ``find-lr`` and by ``--find-lr`` with ``--schedule constant``.
    """

    min_lr: float = 1e-7
    max_lr: float = 1.0
    num_steps: int = 200
    smoothing: int = 5
    probe_steps: int = 100

    def validate(self) -> None:
        """Check the sweep settings.

        Raises:
            UserError: A setting is out of range, naming it and suggesting a value.
        """
        from birdnet_stm32.training.lr_analysis import check_sweep_args

        check_sweep_args(self.min_lr, self.max_lr, self.num_steps, self.smoothing, self.probe_steps)


@dataclass
class TrainConfig:
    """Training settings.

    Args:
        epochs: Maximum number of epochs.
        batch_size: Global batch size (split across replicas by ``tf.distribute``).
        lr: Learning rate: the schedule's peak (or the constant LR). ``0`` means "not set": use
            the LR finder's result with ``find_lr``, else ``DEFAULT_LR``.
        find_lr: Run the LR range test before training and feed its result into the schedule.
        schedule: ``"cosine"`` (linear warmup + cosine decay), ``"onecycle"`` or ``"constant"``.
        warmup_epochs: Warmup length of the cosine schedule in epochs.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with Nesterov momentum).
        weight_decay: Decoupled weight decay (adamw) or L2-free decay (sgd).
        momentum: Momentum of sgd.
        label_smoothing: Label smoothing of the loss.
        class_weights: Weight classes by inverse frequency.
        patience: Early-stopping patience in epochs (0 = off).
        seed: Seed for Python, NumPy, TensorFlow and Keras.
        strategy: ``"auto"``, ``"default"``, ``"mirrored"`` or ``"multiworker"``.
        steps_per_execution: Batches run per ``tf.function`` call.
        lr_finder: Settings of the LR range test.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.0
    find_lr: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 2.0
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    label_smoothing: float = 0.05
    class_weights: bool = True
    patience: int = 10
    seed: int = 42
    strategy: str = "auto"
    steps_per_execution: int = 1
    lr_finder: LRFinderConfig = field(default_factory=LRFinderConfig)

    def validate(self) -> None:
        """Check the settings.

        Raises:
            UserError: A setting is out of range, naming it.
        """
        _check(self.epochs >= 1, f"--epochs {self.epochs}: must be >= 1")
        _check(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1")
        _check(self.lr >= 0, f"--lr {self.lr}: must be > 0 (or 0 for not set)")
        _check(
            self.schedule in ("cosine", "onecycle", "constant"),
            f"--schedule {self.schedule}: choose cosine, onecycle or constant",
        )
        _check(self.optimizer in ("adam", "adamw", "sgd"), f"--optimizer {self.optimizer}: choose adam, adamw or sgd")
        _check(
            self.strategy in ("auto", "default", "mirrored", "multiworker"),
            f"--strategy {self.strategy}: choose auto, default, mirrored or multiworker",
        )
        _check(0 <= self.label_smoothing < 1, f"train.label_smoothing={self.label_smoothing}: must be in [0, 1)")
        _check(self.steps_per_execution >= 1, f"train.steps_per_execution={self.steps_per_execution}: must be >= 1")


@dataclass
class ExportConfig:
    """Post-training quantization and fidelity thresholds.

    Args:
        per_channel: Per-channel weight quantization (``False`` = per-tensor).
        int8_io: int8 model input and output instead of float32 with QUANTIZE/DEQUANTIZE at the edges.
        calibration_samples: Number of chunks in the representative dataset.
        min_cosine: Lowest acceptable mean cosine similarity between Keras and TFLite outputs.
        min_top1_agreement: Lowest acceptable top-1 agreement between Keras and TFLite on the validation chunks
            that contain a species.
        max_accuracy_drop: Largest acceptable accuracy drop (fraction, e.g. 0.02 = 2 points).
        strict: Fail when the STM32N6 audit finds any problem.
    """

    per_channel: bool = True
    int8_io: bool = False
    calibration_samples: int = 300
    min_cosine: float = 0.95
    min_top1_agreement: float = 0.95
    max_accuracy_drop: float = 0.03
    strict: bool = False

    def validate(self) -> None:
        """Check the settings.

        Raises:
            UserError: A setting is out of range, naming it.
        """
        _check(self.calibration_samples >= 1, f"--calibration-samples {self.calibration_samples}: must be >= 1")
        _check(-1 <= self.min_cosine <= 1, f"export.min_cosine={self.min_cosine}: must be in [-1, 1]")
        agreement, drop = self.min_top1_agreement, self.max_accuracy_drop
        _check(0 <= agreement <= 1, f"export.min_top1_agreement={agreement}: must be in [0, 1]")
        _check(0 <= drop <= 1, f"export.max_accuracy_drop={drop}: must be in [0, 1]")


@dataclass
class Config:
    """The whole configuration of a run: one section per pipeline stage.

    Args:
        audio: Audio and spectrogram settings.
        data: Dataset split, cache and augmentation settings.
        model: Model architecture settings.
        train: Training settings.
        export: Export settings.

    Examples:
        >>> cfg = Config()
        >>> cfg.audio.sample_rate
        22050
        >>> Config.from_dict({"train": {"epochs": 5}}).train.epochs
        5
    """

    audio: AudioConfig = field(default_factory=AudioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> Config:
        """Validate every section.

        Returns:
            The config itself, so calls can be chained.

        Raises:
            UserError: A setting is out of range, naming it.
        """
        for section in (self.audio, self.data, self.model, self.train, self.export):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Return the config as nested plain dicts (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build a config from nested dicts, filling missing values with defaults.

        Args:
            data: Nested mapping ``{section: {field: value}}``; missing keys keep their defaults.
            source: Name of where ``data`` came from, used in error messages.

        Returns:
            A new :class:`Config`.

        Raises:
            UserError: An unknown section or key, or a value of the wrong type.
        """
        return _from_dict(cls, data or {}, source, prefix="")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a YAML config file (for example a run's ``config.yaml``).

        Args:
            path: Path of the YAML file.

        Returns:
            The config, with defaults for everything the file does not set.

        Raises:
            UserError: The file is missing, is not valid YAML or has unknown keys.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--config {path}: file does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if data is not None and not isinstance(data, dict):
            raise UserError(f"--config {path}: expected a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data or {}, source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML, atomically.

        Args:
            path: Destination file.

        Returns:
            The path written.
        """
        from birdnet_stm32.utils import atomic_write_text

        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _from_dict(cls: type, data: dict[str, Any], source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(fields)
            raise UserError(f"{source}: unknown setting '{prefix}{key}' (known: {known})")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _from_dict(type(default), value or {}, source, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, type(default), f"{source}: {prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}={value!r}: expected true or false")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise UserError(f"{where}={value!r}: expected {kind.__name__}")
