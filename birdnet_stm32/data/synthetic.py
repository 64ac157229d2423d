"""A deterministic synthetic bird-call dataset, written as WAV files in class folders.

``birdnet-stm32 make-demo-data --out DIR`` writes ``DIR/<species>/<species>_NNN.wav`` for six
invented "species", each with its own call type and frequency band:

| folder | call | band |
|---|---|---|
| `rising_whistler` | rising whistle (exponential up-sweep) | 2.2 - 4.4 kHz |
| `falling_whistler` | falling whistle (exponential down-sweep) | 5.0 - 2.6 kHz |
| `trilling_wren` | trill: 16-24 short down-slurred pulses per s | 6.8 - 7.4 kHz |
| `harmonic_hooter` | hoot: harmonic stack on a gliding fundamental | 0.65 - 3.3 kHz |
| `warbling_vireo` | warble: fast frequency modulation (8-14 Hz) | 3.5 - 5.5 kHz |
| `chirping_sparrow` | 3-6 quick down-chirps in a row | 9.8 - 8.0 kHz |
| `noise` | background only (no species), optional | |

Every clip is different: duration, pitch (+-8 %), tempo (+-25 %), call timing and level
are random; the background is a random mix of pink noise, gusty low-frequency wind and
hiss (plus rain-like clicks in some clips) at a signal-to-noise ratio drawn from
``snr_db_range`` (measured over the samples where the species calls); in
``distractor_prob`` of the clips a quieter call of another species overlaps. The two
whistles share most of their band and differ in direction only. Low-SNR and overlapped
clips are hard; most are easy, so a small model learns the set in minutes.

Clip ``i`` of class ``k`` is generated from the seed ``(seed, k, i)`` alone, so the same
settings always give the same bytes. A ``demo_manifest.json`` written last records the
settings and the files: re-running with the same settings on a complete folder returns at
once; other settings regenerate the folder (removing files the new settings do not make).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from birdnet_stm32.errors import UserError
from birdnet_stm32.utils import atomic_path, atomic_write_text

#: Name of the file that marks a complete demo dataset.
MANIFEST = "demo_manifest.json"

#: Version of the generator; part of the manifest (a change regenerates existing folders).
GENERATOR_VERSION = 1

#: Folder name of the background-only class.
NOISE_CLASS = "noise"

#: Below this many clips the files are written in-process (starting worker processes costs ~1 s).
_PARALLEL_MIN_CLIPS = 60


@dataclass
class DemoDataConfig:
    """Size and difficulty of the synthetic dataset.

    Args:
        clips_per_class: Recordings per class (at least 2, so every class can be split).
        seed: Random seed; the same settings always give the same files.
        noise_class: Also write a ``noise`` folder of background-only clips.
        sample_rate: Sample rate of the WAV files in Hz (at least 22050: the highest call reaches 10.6 kHz).
        duration_range: Shortest and longest clip in seconds.
        snr_db_range: Lowest and highest signal-to-noise ratio in dB (call vs background, over
            the samples where the species calls).
        distractor_prob: Fraction of clips where a quieter call of another species overlaps.

    Examples:
        >>> DemoDataConfig().clips_per_class
        50
    """

    clips_per_class: int = 50
    seed: int = 2024
    noise_class: bool = True
    sample_rate: int = 22050
    duration_range: tuple[float, float] = (3.0, 6.0)
    snr_db_range: tuple[float, float] = (-6.0, 18.0)
    distractor_prob: float = 0.35

    def validate(self) -> None:
        """Check the settings.

        Raises:
            UserError: A setting is out of range, naming it.
        """
        lo, hi = self.duration_range
        checks = [
            (self.clips_per_class >= 2, f"--clips-per-class {self.clips_per_class}: must be >= 2"),
            (self.sample_rate >= 22050, f"sample_rate={self.sample_rate}: must be >= 22050 Hz"),
            (0 < lo <= hi, f"duration_range={self.duration_range}: need 0 < shortest <= longest"),
            (self.snr_db_range[0] <= self.snr_db_range[1], f"snr_db_range={self.snr_db_range}: low > high"),
            (0 <= self.distractor_prob <= 1, f"distractor_prob={self.distractor_prob}: must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def classes(self) -> list[str]:
        """Folder names written: the species, then ``noise`` if enabled."""
        return list(SPECIES) + ([NOISE_CLASS] if self.noise_class else [])


@dataclass
class DemoSummary:
    """What :func:`make_demo_dataset` wrote (printable).

    Args:
        out_dir: The dataset folder.
        classes: Folder names, species first.
        files: Number of WAV files.
        seconds: Total audio duration in seconds.
        wall_time: Time taken in seconds.
        reused: ``True`` when a complete folder with the same settings was found and kept.
    """

    out_dir: Path
    classes: list[str]
    files: int
    seconds: float
    wall_time: float
    reused: bool

    def __str__(self) -> str:
        action = "kept (same settings)" if self.reused else "written"
        return (f"Demo dataset {action}: {self.out_dir} - {len(self.classes)} classes ({', '.join(self.classes)}), "
                f"{self.files} WAV files, {self.seconds / 60:.1f} min of audio, {self.wall_time:.1f} s")  # fmt: skip


def _sweep(f0: float, f1: float, duration: float, sr: int) -> np.ndarray:
    """Instantaneous frequency of an exponential sweep from ``f0`` to ``f1`` Hz."""
    t = np.arange(int(duration * sr)) / sr
    return f0 * (f1 / f0) ** (t / duration)


def _tone(freq: np.ndarray, sr: int, phase: float = 0.0) -> np.ndarray:
    return np.sin(phase + 2 * np.pi * np.cumsum(freq) / sr)


def _fade(y: np.ndarray, sr: int, seconds: float = 0.01) -> np.ndarray:
    n = min(len(y) // 2, int(seconds * sr))
    ramp = np.sin(np.linspace(0, np.pi / 2, n)) ** 2
    y = y.copy()
    y[:n] *= ramp
    y[len(y) - n :] *= ramp[::-1]
    return y


def _rising(rng: np.random.Generator, sr: int, pitch: float, tempo: float) -> np.ndarray:
    f = _sweep(2200 * pitch * rng.uniform(0.95, 1.05), 4400 * pitch, rng.uniform(0.25, 0.45) / tempo, sr)
    return _fade(_tone(f, sr) + 0.15 * _tone(2 * f, sr), sr)


def _falling(rng: np.random.Generator, sr: int, pitch: float, tempo: float) -> np.ndarray:
    f = _sweep(5000 * pitch, 2600 * pitch * rng.uniform(0.95, 1.05), rng.uniform(0.3, 0.5) / tempo, sr)
    return _fade(_tone(f, sr), sr)


def _trill(rng: np.random.Generator, sr: int, pitch: float, tempo: float) -> np.ndarray:
    t = np.arange(int(rng.uniform(0.6, 1.0) / tempo * sr)) / sr
    cycle = (t * rng.uniform(16, 24) * tempo) % 1.0
    f = pitch * (7400 - 600 * cycle)
    pulses = np.sin(np.pi * cycle) ** 4
    return _fade(_tone(f, sr) * pulses, sr)


def _hoot(rng: np.random.Generator, sr: int, pitch: float, tempo: float) -> np.ndarray:
    duration = rng.uniform(0.3, 0.6) / tempo
    t = np.arange(int(duration * sr)) / sr
    f0 = 650 * pitch * (1 - 0.08 * t / duration) * (1 + 0.01 * np.sin(2 * np.pi * 6 * t))
    stack = sum(a * _tone(k * f0, sr, rng.uniform(0, 2 * np.pi)) for k, a in enumerate([1, 0.7, 0.5, 0.3, 0.2], 1))
    return _fade(stack / 2.7, sr, 0.03)


def _warble(rng: np.random.Generator, sr: int, pitch: float, tempo: float) -> np.ndarray:
    duration = rng.uniform(0.5, 0.9) / tempo
    t = np.arange(int(duration * sr)) / sr
    depth, rate = rng.uniform(500, 900), rng.uniform(8, 14)
    f = pitch * (4500 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) + 300 * (t / duration - 0.5))
    return _fade(_tone(f, sr), sr)


def _chirps(rng: np.random.Generator, sr: int, pitch: float, tempo: float) -> np.ndarray:
    parts = []
    for _ in range(rng.integers(3, 7)):
        n = int(0.045 * sr)
        f = pitch * np.linspace(9800, 8000, n)
        parts += [_fade(_tone(f, sr), sr, 0.005), np.zeros(int(rng.uniform(0.05, 0.09) / tempo * sr))]
    return np.concatenate(parts)


#: Species folder name -> call synthesizer ``(rng, sample_rate, pitch, tempo) -> waveform``.
SPECIES: dict[str, Callable[[np.random.Generator, int, float, float], np.ndarray]] = {
    "rising_whistler": _rising,
    "falling_whistler": _falling,
    "trilling_wren": _trill,
    "harmonic_hooter": _hoot,
    "warbling_vireo": _warble,
    "chirping_sparrow": _chirps,
}


def _call_track(rng: np.random.Generator, species: str, n: int, sr: int, sparse: bool) -> np.ndarray:
    """A track of repeated calls of one species; calls follow each other closely unless ``sparse``."""
    synth = SPECIES[species]
    pitch, tempo = rng.uniform(0.92, 1.08), rng.uniform(0.8, 1.25)
    track = np.zeros(n)
    pos = int(rng.uniform(0.0, 1.5 if sparse else 0.4) * sr)
    while pos < n:
        call = synth(rng, sr, pitch, tempo) * rng.uniform(0.6, 1.0)
        end = min(n, pos + len(call))
        track[pos:end] += call[: end - pos]
        gap = rng.uniform(1.0, 2.5) if sparse else rng.uniform(0.25, 0.9) / tempo
        pos = end + int(gap * sr)
    return track


@functools.lru_cache(maxsize=4)
def _noise_shapes(size: int, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude spectra of pink noise (1/sqrt(f)) and wind (low-pass, 150 Hz corner), each of mean power 1."""
    freqs = np.fft.rfftfreq(size, 1 / sr)
    pink = 1 / np.sqrt(np.maximum(freqs, 20.0))
    wind = 1 / (1 + (freqs / 150.0) ** 2)
    return tuple((s / np.sqrt(np.mean(s**2))).astype(np.float32) for s in (pink, wind))


def _background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Pink noise + hiss and gusty low-frequency wind (random mix), RMS 1, plus rain-like clicks in some clips."""
    size = 1 << (n - 1).bit_length()  # power-of-two FFT: other lengths are up to 10x slower
    pink, wind = _noise_shapes(size, sr)
    w_pink, w_hiss, w_wind = rng.uniform([0.3, 0.0, 0.0], [1.0, 0.4, 1.0])
    shape = (2, len(pink))
    white = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)
    noise = np.fft.irfft(white * np.stack([w_pink * pink + w_hiss, w_wind * wind]), size)[:, :n]
    gusts = 1 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * np.arange(n) / sr + rng.uniform(0, 2 * np.pi))
    mix = noise[0] + noise[1] * gusts
    if rng.random() < 0.3:
        level = np.std(mix)
        for pos in rng.integers(0, n - 200, rng.integers(3, 30)):
            mix[pos : pos + 200] += rng.uniform(1, 4) * level * rng.standard_normal(200) * np.exp(
                -np.arange(200) / 30)  # fmt: skip
    return mix / (np.std(mix) + 1e-12)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def make_clip(cfg: DemoDataConfig, class_index: int, clip_index: int) -> np.ndarray:
    """Generate one clip (deterministic for ``cfg.seed``, the class and the clip number).

    Args:
        cfg: Generator settings.
        class_index: Position in ``cfg.classes`` (species first, then ``noise``).
        clip_index: Clip number within the class.

    Returns:
        The clip, float32 mono at ``cfg.sample_rate``, peak between -20 and -3 dBFS.

    Examples:
        >>> cfg = DemoDataConfig()
        >>> bool(np.array_equal(make_clip(cfg, 0, 1), make_clip(cfg, 0, 1)))
        True
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, class_index, clip_index]))
    sr = cfg.sample_rate
    n = int(rng.uniform(*cfg.duration_range) * sr)
    background = _background(rng, n, sr)
    name = cfg.classes[class_index]
    if name == NOISE_CLASS:
        clip = background
    else:
        calls = _call_track(rng, name, n, sr, sparse=False)
        active = np.abs(calls) > 1e-3
        snr = rng.uniform(*cfg.snr_db_range)
        calls *= 10 ** (snr / 20) / max(_rms(calls[active]), 1e-12)
        clip = calls + background
        if rng.random() < cfg.distractor_prob:
            other = rng.choice([s for s in SPECIES if s != name])
            distractor = _call_track(rng, other, n, sr, sparse=True)
            level = _rms(calls[active]) * 10 ** (-rng.uniform(5, 13) / 20)
            clip += distractor * level / max(_rms(distractor[np.abs(distractor) > 1e-3]), 1e-12)
    peak_db = rng.uniform(-20, -3)
    return (clip * 10 ** (peak_db / 20) / np.max(np.abs(clip))).astype(np.float32)


def make_demo_dataset(out_dir: str | Path, cfg: DemoDataConfig | None = None) -> DemoSummary:
    """Write the synthetic dataset as 16-bit WAV files in class folders.

    If ``out_dir`` already holds a complete dataset made with the same settings (see
    ``demo_manifest.json``), nothing is written. Otherwise every file is (re)written
    atomically, files of an earlier demo run that the new settings do not produce are
    removed, and the manifest is written last.

    Args:
        out_dir: Dataset folder (created if needed).
        cfg: Generator settings (default :class:`DemoDataConfig`).

    Returns:
        A printable :class:`DemoSummary`.

    Raises:
        UserError: Bad settings, or ``out_dir`` is a non-empty folder that is not a demo dataset.

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "demo"
        >>> summary = make_demo_dataset(out, DemoDataConfig(clips_per_class=2, duration_range=(1.0, 1.0)))
        >>> summary.files, sorted(p.name for p in out.iterdir())[:2]
        (14, ['chirping_sparrow', 'demo_manifest.json'])
    """
    cfg = cfg or DemoDataConfig()
    cfg.validate()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file, expected a folder")
    settings = {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(cfg)}
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from JSON
    old = _read_manifest(out_dir)
    if old is None and out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"--out {out_dir}: folder is not empty and is not a demo dataset (no {MANIFEST}); "
                        "choose a new or empty folder")  # fmt: skip
    if old is not None and old.get("settings") == settings and _complete(out_dir, old.get("files", {})):
        return DemoSummary(out_dir, cfg.classes, len(old["files"]), float(old["seconds"]),
                           time.perf_counter() - start, reused=True)  # fmt: skip
    (out_dir / MANIFEST).unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    files: dict[str, int] = {}
    seconds = 0.0
    jobs = [(cfg, out_dir, k, i) for k in range(len(cfg.classes)) for i in range(cfg.clips_per_class)]
    workers = min(os.cpu_count() or 1, 4) if len(jobs) >= _PARALLEL_MIN_CLIPS else 1
    with contextlib.ExitStack() as stack:
        if workers > 1:  # "spawn": forking a process that has TensorFlow loaded can deadlock
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(workers, mp_context=context))
            results = pool.map(_write_clip, jobs, chunksize=8)
        else:
            results = map(_write_clip, jobs)
        for relative, size, duration in tqdm(results, total=len(jobs), desc="Writing demo clips", unit="clip"):
            files[relative] = size
            seconds += duration
    for relative in set((old or {}).get("files", {})) - set(files):
        (out_dir / relative).unlink(missing_ok=True)
    manifest = {"settings": settings, "files": files, "seconds": seconds}
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return DemoSummary(out_dir, cfg.classes, len(files), seconds, time.perf_counter() - start, reused=False)


def _write_clip(job: tuple[DemoDataConfig, Path, int, int]) -> tuple[str, int, float]:
    """Generate and write one clip; returns its relative path, file size in bytes and duration in seconds."""
    cfg, out_dir, k, i = job
    name = cfg.classes[k]
    relative = f"{name}/{name}_{i:03d}.wav"
    clip = make_clip(cfg, k, i)
    with atomic_path(out_dir / relative) as tmp:
        sf.write(tmp, clip, cfg.sample_rate, subtype="PCM_16", format="WAV")
    return relative, (out_dir / relative).stat().st_size, len(clip) / cfg.sample_rate


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        data = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _complete(out_dir: Path, files: dict[str, int]) -> bool:
    return bool(files) and all(
        (out_dir / rel).is_file() and (out_dir / rel).stat().st_size == size for rel, size in files.items()
    )
