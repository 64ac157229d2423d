"""Datasets: class-folder discovery, grouped split, feature cache and ``tf.data`` pipelines.

A dataset is a folder with one sub-folder per class::

    ROOT/
      Turdus_merula/      XC1234.wav, XC5678.flac, site3/2024-05-01.mp3 ...
      Erithacus_rubecula/ ...
      noise/              optional: recordings with no target species

Classes are the sorted folder names; a folder named ``noise`` or ``background``
(any case) is not a class: its chunks get an all-zero label. Files are found
recursively and kept when their extension is in
:data:`~birdnet_stm32.audio.io.SUPPORTED_EXTENSIONS`; hidden files and folders are ignored.

Features are computed once per file and cached on disk (see :func:`load_features`);
the split into training and validation sets is stratified by class and grouped by
recording (see :func:`split_train_val`). TensorFlow is imported only by
:func:`make_tf_dataset`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from birdnet_stm32.audio.features import FEATURE_VERSION, compute_features, input_shape
from birdnet_stm32.audio.io import SUPPORTED_EXTENSIONS, AudioDecodeError, is_audio_file, load_chunks
from birdnet_stm32.config import AudioConfig, DataConfig
from birdnet_stm32.errors import UserError
from birdnet_stm32.utils import atomic_path

log = logging.getLogger(__name__)

#: Folder names (compared in lower case) that hold recordings without any target species.
NOISE_FOLDERS = frozenset({"noise", "background"})

#: Label index of files in a noise/background folder (all-zero target vector).
NOISE_LABEL = -1

#: Environment variable that sets the feature-cache folder when ``data.cache_dir`` is empty.
CACHE_ENV = "BIRDNET_STM32_CACHE"


@dataclass
class DatasetIndex:
    """The recordings of a dataset and their labels, before any audio is read.

    Args:
        root: The dataset folder (``None`` for a plain list of files).
        classes: Class names in label order.
        files: Recording paths, sorted by path within each class folder.
        labels: For each file, its index into ``classes``, or :data:`NOISE_LABEL` (-1) for
            noise/background recordings (all-zero target).

    Examples:
        >>> idx = DatasetIndex(None, ["a", "b"], [Path("x.wav"), Path("y.wav")], [0, -1])
        >>> len(idx), idx.label_name(1)
        (2, 'noise')
    """

    root: Path | None
    classes: list[str]
    files: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)

    def label_name(self, i: int) -> str:
        """Name of file ``i``'s label: its class, or ``"noise"`` for a noise/background recording.

        Args:
            i: File position in :attr:`files`.

        Returns:
            The class name or ``"noise"``.
        """
        return "noise" if self.labels[i] == NOISE_LABEL else self.classes[self.labels[i]]

    def subset(self, indices: Sequence[int]) -> DatasetIndex:
        """A new index with the given files (same root and classes).

        Args:
            indices: Positions in :attr:`files`, kept in the given order.

        Returns:
            The smaller index.
        """
        return DatasetIndex(self.root, list(self.classes), [self.files[i] for i in indices],
                            [self.labels[i] for i in indices])  # fmt: skip

    def counts(self) -> dict[str, int]:
        """Number of files per label name (classes in label order, then ``"noise"`` if present).

        Returns:
            Mapping label name -> file count.
        """
        counts = {name: 0 for name in self.classes}
        for i in range(len(self.files)):
            name = self.label_name(i)
            counts[name] = counts.get(name, 0) + 1
        return counts


@dataclass
class Features:
    """Model inputs and targets of a set of recordings, one row per chunk.

    Args:
        x: Inputs, shape ``(N, H, W, 1)``, float32 (see :func:`~birdnet_stm32.audio.features.compute_features`).
        y: Targets, shape ``(N, C)``, float32: one-hot, or all zeros for noise/background chunks.
        groups: Recording of each chunk as an index into ``files``, shape ``(N,)``, int.
        files: Recording paths (as strings).
        classes: Class names in label order (``C`` of them).
        skipped: Files that could not be read and were left out (each with a logged warning).
        audio: Audio settings the inputs were computed with (used by gain augmentation).

    Examples:
        >>> f = Features(np.zeros((3, 4, 8, 1), np.float32), np.eye(2, dtype=np.float32)[[0, 0, 1]],
        ...              np.array([0, 0, 1]), ["a.wav", "b.wav"], ["a", "b"])
        >>> len(f), f.chunk_counts()
        (3, {'a': 2, 'b': 1})
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    files: list[str]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)
    audio: AudioConfig | None = None

    def __len__(self) -> int:
        return len(self.x)

    def chunk_counts(self) -> dict[str, int]:
        """Number of chunks per class (and ``"noise"`` for all-zero rows).

        Returns:
            Mapping label name -> chunk count.
        """
        counts = {name: int(n) for name, n in zip(self.classes, (self.y > 0).sum(axis=0), strict=True)}
        noise = int((self.y.sum(axis=1) <= 0).sum()) if self.y.shape[1] else 0
        if noise:
            counts["noise"] = noise
        return counts


def discover(root: str | Path, *, classes: Sequence[str] | None = None) -> DatasetIndex:
    """Find the class folders and audio files of a dataset.

    Args:
        root: Dataset folder with one sub-folder per class.
        classes: Force this label order (for example a trained run's labels when evaluating
            on new data). Every class folder must then be one of ``classes``; a class with
            no folder only gets a warning (its metrics will be empty).

    Returns:
        The :class:`DatasetIndex`; files sorted by path, classes sorted by name (or in the
        given order).

    Raises:
        UserError: ``root`` is missing or not a folder; fewer than two class folders
            (without ``classes``); a class folder holds no supported audio file; a folder
            does not match the forced ``classes``.

    Examples:
        >>> import tempfile, soundfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("wren", "robin", "noise"):
        ...     (root / name).mkdir()
        ...     soundfile.write(root / name / "a.wav", np.zeros(800), 8000)
        >>> idx = discover(root)
        >>> idx.classes, idx.labels
        (['robin', 'wren'], [0, 1, -1])
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise UserError(f"{root}: is a file, expected a dataset folder with one sub-folder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_folders = [p for p in folders if p.name.lower() not in NOISE_FOLDERS]
    noise_folders = [p for p in folders if p.name.lower() in NOISE_FOLDERS]
    found = [p.name for p in class_folders]
    if classes is None:
        if len(class_folders) < 2:
            raise UserError(
                f"{root}: found {len(class_folders)} class folder(s) ({', '.join(found) or 'none'}); "
                "need at least two (ROOT/<class>/<audio files>)"
            )
        classes = found
    else:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"{root}: folder(s) {', '.join(unknown)} are not classes of the model ({len(classes)} "
                            f"classes: {', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''})")  # fmt: skip
        missing = [c for c in classes if c not in found]
        if missing:
            log.warning("%s: no folder for class(es) %s", root, ", ".join(missing))
    by_name = {p.name: p for p in class_folders}
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if name not in by_name:
            continue
        audio = _audio_files(by_name[name])
        if not audio:
            raise UserError(f"{by_name[name]}: class folder holds no audio file (supported: "
                            f"{' '.join(sorted(SUPPORTED_EXTENSIONS))})")  # fmt: skip
        files += audio
        labels += [label] * len(audio)
    for folder in noise_folders:
        audio = _audio_files(folder)
        if not audio:
            log.warning("%s: noise folder holds no audio file; ignored", folder)
        files += audio
        labels += [NOISE_LABEL] * len(audio)
    return DatasetIndex(root, classes, files, labels)


def _audio_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and is_audio_file(f)]
    return sorted(found)


def limit_per_class(index: DatasetIndex, max_files: int, seed: int) -> DatasetIndex:
    """Keep at most ``max_files`` recordings per label, chosen at random but reproducibly.

    Args:
        index: The dataset index.
        max_files: Largest number of files per class (and for noise); 0 keeps everything.
        seed: Random seed; the choice does not depend on the order of ``index.files``.

    Returns:
        The reduced index (files in their original order).
    """
    if max_files <= 0:
        return index
    keep: list[int] = []
    for members in _by_label(index, seed).values():
        keep += members[:max_files]
    return index.subset(sorted(keep))


def _by_label(index: DatasetIndex, seed: int) -> dict[int, list[int]]:
    """File positions per label, in a seeded random order that ignores how the files were listed."""
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(index.labels):
        groups.setdefault(label, []).append(i)
    out = {}
    for label, members in sorted(groups.items()):
        members.sort(key=lambda i: _relative_key(index, i))
        name = index.label_name(members[0])
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out[label] = [members[j] for j in rng.permutation(len(members))]
    return out


def _relative_key(index: DatasetIndex, i: int) -> str:
    path = index.files[i]
    if index.root is not None:
        try:
            return path.relative_to(index.root).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def split_train_val(index: DatasetIndex, val_fraction: float, seed: int) -> tuple[DatasetIndex, DatasetIndex]:
    """Split recordings into training and validation sets, stratified by class.

    Whole recordings go to one side, so chunks of one recording never land on both.
    Per label (each class and the noise folder), the files are sorted by their path
    relative to the dataset root, shuffled with a generator seeded by ``seed`` and the
    label's name, and the first ``round(val_fraction * n)`` go to validation (at least one
    and at most ``n - 1`` when a label has two or more files; a label with a single file
    stays in training). The result therefore depends only on the file names and the seed,
    not on the order the filesystem lists them in.

    Args:
        index: The dataset index.
        val_fraction: Fraction of each label's recordings for validation, in (0, 1).
        seed: Random seed.

    Returns:
        ``(train_index, val_index)``, each with files in their original order.

    Raises:
        UserError: ``val_fraction`` is not in (0, 1).

    Examples:
        >>> files = [Path(f"{c}/{i}.wav") for c in "ab" for i in range(5)]
        >>> train, val = split_train_val(DatasetIndex(None, ["a", "b"], files, [0] * 5 + [1] * 5), 0.2, seed=1)
        >>> len(train), len(val), sorted(val.labels)
        (8, 2, [0, 1])
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction}: must be between 0 and 1")
    val: list[int] = []
    for members in _by_label(index, seed).values():
        n = len(members)
        n_val = min(max(int(round(val_fraction * n)), 1), n - 1) if n >= 2 else 0
        val += members[:n_val]
    val_set = set(val)
    return index.subset([i for i in range(len(index)) if i not in val_set]), index.subset(sorted(val))


def cache_root(data_cfg: DataConfig) -> Path:
    """Folder of the feature cache.

    Args:
        data_cfg: Data settings.

    Returns:
        ``data_cfg.cache_dir`` if set, else ``$BIRDNET_STM32_CACHE`` if set, else
        ``~/.cache/birdnet_stm32``.
    """
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "birdnet_stm32"


def _settings_key(audio_cfg: AudioConfig) -> str:
    settings = {"feature_version": FEATURE_VERSION, **dataclasses.asdict(audio_cfg)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_entry(path: Path, audio_cfg: AudioConfig, root: Path) -> Path:
    """Cache file of one recording: keyed by the audio settings and the file's path, size and mtime.

    Any change to the settings, or to the file (new size or modification time), gives a new
    key, so a stale entry is never read.

    Args:
        path: The recording.
        audio_cfg: Audio settings the features are computed with.
        root: The cache folder (:func:`cache_root`).

    Returns:
        ``root/features-v<version>/<settings key>/<2 hex>/<file key>.npy``.

    Raises:
        OSError: The recording cannot be stat'ed.
    """
    resolved = path.resolve()
    stat = resolved.stat()
    identity = f"{resolved.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return root / f"features-v{FEATURE_VERSION}" / _settings_key(audio_cfg) / key[:2] / f"{key}.npy"


def _read_entry(entry: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A cached feature array, or ``None`` when the entry is missing, unreadable or not what it should be."""
    if not entry.is_file():
        return None
    try:
        array = np.load(entry, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        log.info("rebuilding unreadable cache entry %s (%s)", entry, exc)
        return None
    if array.dtype != np.float32 or array.ndim != 3 or array.shape[1:] != shape or not len(array):
        log.info("rebuilding cache entry %s (unexpected shape %s %s)", entry, array.shape, array.dtype)
        return None
    if not np.isfinite(array).all():
        log.info("rebuilding cache entry %s (non-finite values)", entry)
        return None
    return array


def _extract(path: str, audio_cfg: AudioConfig, entry: str) -> tuple[str, str | None]:
    """Worker: compute one recording's features and write them to the cache. Returns ``(path, error)``."""
    try:
        features = compute_features(load_chunks(path, audio_cfg), audio_cfg)[..., 0]
    except AudioDecodeError as exc:
        return path, str(exc)
    with atomic_path(entry) as tmp:
        np.save(tmp, features)
    return path, None


def load_features(
    index_or_files: DatasetIndex | Sequence[str | Path],
    audio_cfg: AudioConfig,
    data_cfg: DataConfig,
    *,
    progress: bool = True,
) -> Features:
    """Compute (or read from the cache) the model inputs of every recording.

    Recordings without a valid cache entry are decoded and transformed in parallel worker
    processes (``data_cfg.workers``; 0 = one per CPU core) with a progress bar; each result
    is written atomically to the cache (:func:`cache_entry`). Cached entries that cannot be
    read or have the wrong shape are rebuilt. A file that cannot be decoded is skipped
    with a warning naming it, and listed in :attr:`Features.skipped`.

    Args:
        index_or_files: A :class:`DatasetIndex`, or plain audio paths (unlabeled: ``y`` gets
            zero columns).
        audio_cfg: Audio settings.
        data_cfg: Data settings (``cache_dir``, ``workers``).
        progress: Show a progress bar.

    Returns:
        The :class:`Features`, chunks in file order.

    Raises:
        UserError: A class ends with no readable audio, no file at all could be read, or the
            cache folder is not writable.
    """
    if isinstance(index_or_files, DatasetIndex):
        index = index_or_files
    else:
        index = DatasetIndex(None, [], [Path(p) for p in index_or_files], [NOISE_LABEL] * len(index_or_files))
    arrays, skipped = _load_arrays(index, audio_cfg, data_cfg, progress)
    _check_readable(index, arrays)
    return _assemble(index, arrays, skipped, audio_cfg)


def _load_arrays(index: DatasetIndex, audio_cfg: AudioConfig, data_cfg: DataConfig, progress: bool
                 ) -> tuple[dict[str, np.ndarray], list[str]]:  # fmt: skip
    """Feature arrays ``(n_chunks, H, W)`` by file path (cached or computed), and the unreadable files."""
    root = cache_root(data_cfg)
    shape = input_shape(audio_cfg)[:2]
    arrays: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    todo: dict[str, Path] = {}
    # the bar only appears if reading the cache takes more than 2 s (large datasets)
    for path in tqdm(index.files, desc="Reading feature cache", unit="file", delay=2, disable=not progress):
        key = str(path)
        try:
            entry = cache_entry(path, audio_cfg, root)
        except OSError as exc:
            errors[key] = f"{path}: cannot read file ({exc.strerror or exc})"
            continue
        array = _read_entry(entry, shape)
        if array is None:
            todo[key] = entry
        else:
            arrays[key] = array
    if todo:
        _check_writable(root)
        with tqdm(total=len(todo), desc="Computing features", unit="file", disable=not progress) as bar:
            for key, error in _run_extraction(todo, audio_cfg, data_cfg.workers):
                bar.update()
                array = None if error else _read_entry(todo[key], shape)
                if array is not None:
                    arrays[key] = array
                else:
                    errors[key] = error or f"{key}: cache entry {todo[key]} could not be read back"
    elif len(index):
        log.info("Features of all %d files read from the cache %s", len(index), root)
    skipped = sorted(errors)
    for key in skipped:
        log.warning("skipping %s", errors[key])
    if skipped:
        log.warning("%d of %d file(s) could not be read and were skipped", len(skipped), len(index))
    return arrays, skipped


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise UserError(f"data.cache_dir={root}: feature cache folder is not writable ({reason})") from None


def _run_extraction(todo: dict[str, Path], audio_cfg: AudioConfig, workers: int):
    """Yield ``(path, error or None)`` as files finish, in worker processes when there is more than one file."""
    workers = min(workers or os.cpu_count() or 1, len(todo))
    if workers <= 1:
        for path, entry in todo.items():
            yield _extract(path, audio_cfg, str(entry))
        return
    # "spawn": forking a process that has TensorFlow loaded can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_extract, path, audio_cfg, str(entry)) for path, entry in todo.items()]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError(
                f"data.workers={workers}: a feature worker process died (out of memory? or a script calling this "
                "without an 'if __name__ == \"__main__\":' guard); try data.workers=1"
            ) from None


def _check_readable(index: DatasetIndex, arrays: dict[str, np.ndarray]) -> None:
    """Raise when a class (or the whole set) is left without a readable recording."""
    files_per_class = np.zeros(len(index.classes), dtype=np.int64)
    readable = np.zeros(len(index.classes), dtype=np.int64)
    for path, label in zip(index.files, index.labels, strict=True):
        if label != NOISE_LABEL:
            files_per_class[label] += 1
            readable[label] += str(path) in arrays
    for label in np.flatnonzero((readable == 0) & (files_per_class > 0)):
        raise UserError(f"class '{index.classes[label]}': none of its {files_per_class[label]} file(s) could be "
                        "read (see the warnings above)")  # fmt: skip
    if len(index) and not arrays:
        raise UserError(f"none of the {len(index)} audio file(s) could be read (see the warnings above)")


def _assemble(index: DatasetIndex, arrays: dict[str, np.ndarray], skipped: list[str], audio_cfg: AudioConfig
              ) -> Features:  # fmt: skip
    """Stack the arrays of ``index``'s readable files into :class:`Features`, removing them from ``arrays``."""
    kept = [i for i, path in enumerate(index.files) if str(path) in arrays]
    n = sum(len(arrays[str(index.files[i])]) for i in kept)
    height, width, _ = input_shape(audio_cfg)
    x = np.empty((n, height, width, 1), dtype=np.float32)
    y = np.zeros((n, len(index.classes)), dtype=np.float32)
    groups = np.empty(n, dtype=np.int64)
    row = 0
    for g, i in enumerate(kept):
        array = arrays.pop(str(index.files[i]))
        rows = slice(row, row + len(array))
        x[rows, ..., 0] = array
        if index.labels[i] != NOISE_LABEL:
            y[rows, index.labels[i]] = 1.0
        groups[rows] = g
        row += len(array)
    mine = {str(p) for p in index.files}
    return Features(x, y, groups, [str(index.files[i]) for i in kept], list(index.classes),
                    [f for f in skipped if f in mine], audio_cfg)  # fmt: skip


def prepare_datasets(
    data_dir: str | Path,
    audio_cfg: AudioConfig,
    data_cfg: DataConfig,
    seed: int,
    val_dir: str | Path | None = None,
) -> tuple[Features, Features]:
    """Discover, split and load a dataset: the one call the trainer and the exporter use.

    Steps: :func:`discover` ``data_dir``; keep at most ``data_cfg.max_files_per_class``
    recordings per class; split with :func:`split_train_val` (or, with ``val_dir``, use
    that folder, labelled with the training classes, as the validation set); load the
    features of both sets through the cache (:func:`load_features`).

    Args:
        data_dir: Dataset root (``ROOT/<class>/<audio files>``).
        audio_cfg: Audio settings.
        data_cfg: Data settings.
        seed: Seed of the split and of the per-class file limit.
        val_dir: Optional validation dataset root that overrides the split.

    Returns:
        ``(train, val)`` :class:`Features`; both list the training classes.

    Raises:
        UserError: Bad settings, a bad dataset folder (see :func:`discover` and
            :func:`load_features`), or no recording left for validation.
    """
    audio_cfg.validate()
    data_cfg.validate()
    index = limit_per_class(discover(data_dir), data_cfg.max_files_per_class, seed)
    if val_dir is not None:
        if Path(val_dir).resolve() == Path(data_dir).resolve():
            raise UserError(f"--val-data {val_dir}: is the training folder; give a separate validation folder")
        train_index, val_index = index, discover(val_dir, classes=index.classes)
    else:
        train_index, val_index = split_train_val(index, data_cfg.val_fraction, seed)
        if not len(val_index):
            raise UserError(f"{data_dir}: too few recordings to hold any out for validation (every class has one "
                            "file); add recordings or pass --val-data")  # fmt: skip
    both = DatasetIndex(index.root, list(index.classes), train_index.files + val_index.files,
                        train_index.labels + val_index.labels)  # fmt: skip
    arrays, skipped = _load_arrays(both, audio_cfg, data_cfg, progress=True)
    _check_readable(train_index, arrays)
    train = _assemble(train_index, arrays, skipped, audio_cfg)
    val = _assemble(val_index, arrays, skipped, audio_cfg)
    if not len(val):
        raise UserError(f"{val_dir or data_dir}: no readable validation recording")
    log.info("Dataset %s: %d classes; training %d recordings / %d chunks %s; validation %d recordings / %d chunks%s",
             data_dir, len(train.classes), len(train.files), len(train), train.chunk_counts(), len(val.files),
             len(val), f"; {len(skipped)} unreadable file(s) skipped" if skipped else "")  # fmt: skip
    return train, val


def make_tf_dataset(
    features: Features,
    batch_size: int,
    *,
    training: bool,
    data_cfg: DataConfig,
    seed: int,
    repeat: int | None = None,
) -> Any:
    """A ``tf.data`` pipeline of ``(x, y)`` batches from in-memory features.

    Training: every epoch is a fresh seeded shuffle, batches are full
    (``drop_remainder=True``, static shapes) and augmented with
    :func:`birdnet_stm32.data.augment.augment_batch` (gain, SpecAugment masks, mixup, each
    off when its ``data_cfg`` setting is 0). Evaluation: file order, no augmentation, the
    last batch may be smaller. Both prefetch. Augmentation is deterministic for a seed.

    Args:
        features: The inputs and targets.
        batch_size: Examples per batch.
        training: Shuffle, augment and repeat (``True``) or a plain single pass (``False``).
        data_cfg: Augmentation settings.
        seed: Seed of shuffling and augmentation.
        repeat: Number of passes over the data; ``None`` = endless for training, one for
            evaluation (pass ``steps_per_epoch`` to ``fit`` with an endless dataset).

    Returns:
        A ``tf.data.Dataset`` yielding ``x (B, H, W, 1)`` float32 and ``y (B, C)`` float32.

    Raises:
        UserError: The training set has fewer chunks than ``batch_size``.
    """
    import tensorflow as tf

    n = len(features)
    if training and n < batch_size:
        raise UserError(f"--batch-size {batch_size}: larger than the training set ({n} chunks)")
    x_all, y_all = features.x, features.y
    x_spec = tf.TensorSpec((batch_size if training else None, *x_all.shape[1:]), tf.float32)
    y_spec = tf.TensorSpec((batch_size if training else None, y_all.shape[1]), tf.float32)

    def gather(idx):
        # Rows are gathered in NumPy: the features never become a constant in the dataset graph, which
        # tf.distribute would serialize (slow for large sets, impossible above 2 GB) and which would copy them.
        x, y = tf.numpy_function(lambda i: (x_all[i], y_all[i]), [idx], (tf.float32, tf.float32), stateful=False)
        return tf.ensure_shape(x, x_spec.shape), tf.ensure_shape(y, y_spec.shape)

    ds = tf.data.Dataset.range(n)
    if training:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    count = (-1 if training else 1) if repeat is None else repeat
    ds = ds.repeat(count).batch(batch_size, drop_remainder=training)
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training:
        from birdnet_stm32.data.augment import augment_batch

        if data_cfg.gain_db > 0 and features.audio is None:
            log.warning("random gain skipped: the features do not say which audio settings made them")
        ds = ds.enumerate().map(
            lambda step, batch: augment_batch(*batch, step, seed, data_cfg, features.audio),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    options = tf.data.Options()
    # Each pipeline op on one thread: a multi-threaded op would queue its shards into the thread pool the model's
    # operations use, and on a few cores every shard it takes delays a whole model operation.
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
