"""Decode recordings, down-mix, resample and cut them into fixed-length chunks.

Everything here is NumPy: a recording becomes a float32 mono signal at the
model's sample rate (:func:`load_audio`), then a stack of equally long chunks
with quiet ones dropped (:func:`chunk_signal`). :func:`load_chunks` does both.

Chunking rule (``cfg`` is an :class:`~birdnet_stm32.config.AudioConfig`):

* chunks are ``cfg.chunk_samples`` long and start every ``chunk_samples - overlap``
  samples (``overlap = round(cfg.chunk_overlap * cfg.sample_rate)``);
* a recording shorter than one chunk gives one chunk, zero-padded at the end;
* if more than :data:`TAIL_FRACTION` of a chunk is left over after the last full
  chunk, one more chunk is taken, aligned to the end of the recording (so the tail
  is covered without padding);
* silence rule: each chunk's RMS level is measured in dB; chunks more than
  ``cfg.silence_db`` dB below the loudest chunk of the same recording are dropped.
  The loudest chunk always survives, so every readable file gives at least one
  chunk. ``cfg.silence_db = 0`` keeps every chunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from birdnet_stm32.config import AudioConfig
from birdnet_stm32.errors import UserError


def _supported_extensions() -> frozenset[str]:
    formats = sf.available_formats()
    extensions = {".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff"}
    if "MP3" in formats:  # libsndfile >= 1.1 decodes MP3
        extensions.add(".mp3")
    if "OPUS" in sf.available_subtypes("OGG"):
        extensions.add(".opus")
    return frozenset(extensions)


#: File extensions (lower case, with the dot) that :func:`load_audio` decodes with the installed libsndfile.
#: MP3 is included when libsndfile is 1.1 or newer, Opus when it was built with Opus support.
SUPPORTED_EXTENSIONS: frozenset[str] = _supported_extensions()

#: Leftover after the last full chunk, as a fraction of a chunk, above which an end-aligned chunk is added.
TAIL_FRACTION = 0.25

#: Quality setting of the soxr resampler ("HQ": 20-bit precision, linear phase, passband to 91 % of Nyquist).
RESAMPLE_QUALITY = "HQ"


class AudioDecodeError(UserError):
    """A recording could not be read: missing, corrupt, empty or in an unsupported format.

    The message names the file.

    Examples:
        >>> str(AudioDecodeError("a.wav: file is empty"))
        'a.wav: file is empty'
    """


def is_audio_file(path: str | Path) -> bool:
    """Tell whether a path has an extension listed in :data:`SUPPORTED_EXTENSIONS`.

    Args:
        path: A file path.

    Returns:
        ``True`` for a supported audio extension (case-insensitive), else ``False``.

    Examples:
        >>> is_audio_file("recordings/robin/XC123.WAV"), is_audio_file("notes.txt")
        (True, False)
    """
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode a recording into a float32 mono signal at ``sample_rate``.

    Multi-channel audio is down-mixed by averaging the channels. The signal is
    resampled with soxr (quality :data:`RESAMPLE_QUALITY`) when the file's rate differs.
    Sample values keep the file's scale (full scale = 1.0).

    Args:
        path: An audio file with an extension in :data:`SUPPORTED_EXTENSIONS`.
        sample_rate: Target sample rate in Hz.

    Returns:
        The signal, shape ``(n_samples,)``, dtype float32.

    Raises:
        AudioDecodeError: The file is missing, has an unsupported extension, cannot be
            decoded, holds no samples or holds non-finite samples.

    Examples:
        >>> import tempfile, pathlib, soundfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "tone.wav"
        >>> soundfile.write(path, np.zeros((44100, 2)), 44100)
        >>> load_audio(path, 22050).shape
        (22050,)
    """
    path = Path(path)
    if not is_audio_file(path):
        supported = " ".join(sorted(SUPPORTED_EXTENSIONS))
        raise AudioDecodeError(f"{path}: unsupported audio format {path.suffix or '(none)'!r} (supported: {supported})")
    if not path.is_file():
        raise AudioDecodeError(f"{path}: file does not exist")
    try:
        data, file_rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioDecodeError(f"{path}: cannot decode audio ({reason})") from None
    if data.size == 0:
        raise AudioDecodeError(f"{path}: file holds no audio samples")
    y = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(y).all():
        raise AudioDecodeError(f"{path}: file holds non-finite (NaN or infinite) samples")
    if file_rate != sample_rate:
        y = soxr.resample(y, file_rate, sample_rate, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(y, dtype=np.float32)


def chunk_levels_db(chunks: np.ndarray) -> np.ndarray:
    """RMS level of each chunk in dB relative to full scale (a full-scale square wave is 0 dB).

    Args:
        chunks: Array ``(n_chunks, n_samples)``.

    Returns:
        Levels in dBFS, shape ``(n_chunks,)``; digital silence gives -200 dB.

    Examples:
        >>> chunk_levels_db(np.array([[0.5, -0.5], [0.0, 0.0]])).round(1)
        array([  -6., -200.])
    """
    power = np.mean(np.square(chunks, dtype=np.float64), axis=1)
    return 10.0 * np.log10(power + 1e-20)


def chunk_signal(y: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """Cut a signal into fixed-length chunks, pad short signals and drop silent chunks.

    See the module docstring for the exact rule (overlap, end-aligned tail chunk,
    silence threshold relative to the loudest chunk).

    Args:
        y: Mono signal at ``cfg.sample_rate``, shape ``(n_samples,)``.
        cfg: Audio settings (``chunk_samples``, ``chunk_overlap``, ``silence_db``).

    Returns:
        Chunks, shape ``(n_chunks, cfg.chunk_samples)``, float32, ``n_chunks >= 1``, in time order.

    Raises:
        ValueError: ``y`` is empty or not one-dimensional.

    Examples:
        >>> cfg = AudioConfig(sample_rate=8000, chunk_duration=1.0)
        >>> chunk_signal(np.ones(20000, np.float32), cfg).shape  # 2 full chunks + an end-aligned tail chunk
        (3, 8000)
        >>> chunk_signal(np.ones(100, np.float32), cfg).shape  # padded
        (1, 8000)
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"expected a non-empty 1-D signal, got shape {y.shape}")
    n = cfg.chunk_samples
    if y.size <= n:
        return np.pad(y, (0, n - y.size))[None, :]
    step = max(1, n - int(round(cfg.chunk_overlap * cfg.sample_rate)))
    starts = list(range(0, y.size - n + 1, step))
    if y.size - (starts[-1] + n) > TAIL_FRACTION * n:
        starts.append(y.size - n)
    chunks = np.stack([y[s : s + n] for s in starts])
    if cfg.silence_db > 0 and len(chunks) > 1:
        levels = chunk_levels_db(chunks)
        chunks = chunks[levels >= levels.max() - cfg.silence_db]
    return chunks


def load_chunks(path: str | Path, cfg: AudioConfig) -> np.ndarray:
    """Decode a recording and cut it into chunks (:func:`load_audio` then :func:`chunk_signal`).

    Args:
        path: An audio file.
        cfg: Audio settings.

    Returns:
        Chunks, shape ``(n_chunks, cfg.chunk_samples)``, float32, ``n_chunks >= 1``.

    Raises:
        AudioDecodeError: The file cannot be read (see :func:`load_audio`).

    Examples:
        >>> import tempfile, pathlib, soundfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.flac"
        >>> soundfile.write(path, np.full(7 * 22050, 0.1), 22050)
        >>> load_chunks(path, AudioConfig()).shape  # 2 chunks of 3 s + the 1 s tail, end-aligned
        (3, 66150)
    """
    return chunk_signal(load_audio(path, cfg.sample_rate), cfg)
