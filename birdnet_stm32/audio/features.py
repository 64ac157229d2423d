"""Host-side spectrograms: the reference math the microcontroller must reproduce.

The model's input is computed from each chunk by a fixed recipe; every number in
it is reported by :func:`frontend_contract` and written into ``model_config.json``.
For a chunk ``x`` of ``N = chunk_samples`` samples:

1. **Peak normalization**: ``x = x / max(max|x|, PEAK_FLOOR)``. The loudest sample
   of every chunk becomes +-1, so the input level no longer depends on the
   recorder's gain; chunks quieter than ``PEAK_FLOOR`` (-80 dBFS) are not amplified.
2. **STFT**: periodic Hann window ``w[n] = 0.5 - 0.5 cos(2 pi n / n_fft)``,
   ``n = 0 .. n_fft-1``; hop ``H = floor((N - n_fft) / (spec_width - 1))``; no centring
   and no padding: frame ``t`` (``t = 0 .. spec_width-1``) is samples ``t*H`` to
   ``t*H + n_fft - 1``, always inside the chunk (a frame cut off by the chunk edge would
   smear a pure tone over many bins). Exactly ``spec_width`` frames; this equals
   ``librosa.stft(x, n_fft=n_fft, hop_length=H, center=False)[:, :spec_width]``.
3. **Magnitude**: ``|rfft(frame * w)| / (n_fft / 4)``; ``n_fft / 4`` is half the window
   sum, so a full-scale sine centred on a bin gives exactly 1.0 (between bins
   down to 0.85); no real signal in [-1, 1] exceeds 2.0.
4. ``mel`` frontend only: ``M = mel_filterbank(cfg) @ S`` (Slaney mel scale,
   triangular filters of peak 0.5, so a full-scale sine gives at most ~1.0 in any band).
   The ``hybrid`` frontend keeps the ``n_fft/2 + 1`` linear bins; its mel projection is
   a trainable layer in the model, initialized from :func:`mel_filterbank`.
5. **Input scaling** (keeps quiet content above one int8 step):

   * ``mag_scale`` ``"pwl"`` or ``"none"``: ``v = S ** 0.5`` (:data:`INPUT_POWER`; two square
     roots of the bin power on the MCU, no logarithm). Content 60 dB below the chunk's peak
     gives ``v ~ 0.03``, 8 steps of an int8 input quantizer calibrated on [0, 1]; 80 dB below
     still gives 2.5 steps. The in-graph ``pwl`` map (or nothing, for ``"none"``) follows.
   * ``mag_scale="db"``: ``v = clip((20 log10(max(S, 1e-4)) + 80) / 80, 0, 1)``: -80..0 dB
     relative to a full-scale sine maps to [0, 1], one int8 step is 0.31 dB.

The output layout is ``(frequency bins ascending, frames, 1)``: ``(n_mels, spec_width, 1)``
for ``mel`` and ``(n_fft // 2 + 1, spec_width, 1)`` for ``hybrid``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from birdnet_stm32.config import AudioConfig

#: Version of the feature recipe; part of the feature-cache key. Bump it whenever the math here changes.
FEATURE_VERSION = 1

#: Peak normalization never amplifies a chunk by more than ``1 / PEAK_FLOOR`` (80 dB).
PEAK_FLOOR = 1e-4

#: Exponent applied on the host to the normalized magnitude for ``mag_scale`` "pwl" and "none".
INPUT_POWER = 0.5

#: ``mag_scale="db"``: magnitudes below this many dB (relative to a full-scale sine) map to 0.
DB_FLOOR = -80.0

#: Peak value of each triangular mel filter (the Hann main lobe of a sine spans about 2.0 in summed magnitude).
MEL_FILTER_PEAK = 0.5

#: Chunks transformed per NumPy batch (bounds the frame buffer to ~64 MB at the default settings).
_BATCH = 32


def hop_length(cfg: AudioConfig) -> int:
    """STFT hop in samples: ``floor((chunk_samples - n_fft) / (spec_width - 1))``.

    The largest hop whose ``spec_width`` frames of ``n_fft`` samples all fit in the
    chunk, so the frames spread over the whole chunk.

    Args:
        cfg: Audio settings.

    Returns:
        The hop length in samples (257 at the defaults: 66150 samples, n_fft 512, 256 frames).

    Examples:
        >>> hop_length(AudioConfig())
        257
    """
    return (cfg.chunk_samples - cfg.n_fft) // (cfg.spec_width - 1)


def input_shape(cfg: AudioConfig) -> tuple[int, int, int]:
    """Shape of one model input: ``(frequency bins, frames, 1)``.

    Args:
        cfg: Audio settings.

    Returns:
        ``(n_mels, spec_width, 1)`` for the ``mel`` frontend, ``(n_fft // 2 + 1, spec_width, 1)``
        for ``hybrid``.

    Examples:
        >>> input_shape(AudioConfig(frontend="mel"))
        (64, 256, 1)
        >>> input_shape(AudioConfig(frontend="hybrid"))
        (257, 256, 1)
    """
    height = cfg.n_mels if cfg.frontend == "mel" else cfg.n_fft // 2 + 1
    return height, cfg.spec_width, 1


def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window ``w[n] = 0.5 - 0.5 cos(2 pi n / n_fft)``, ``n = 0 .. n_fft-1``.

    Args:
        n_fft: Window length in samples.

    Returns:
        The window, shape ``(n_fft,)``, float32; its sum is ``n_fft / 2``.

    Examples:
        >>> float(hann_window(512).sum())
        256.0
    """
    n = np.arange(n_fft, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.

    Args:
        hz: Frequencies in Hz.

    Returns:
        Mels, same shape as ``hz``.

    Examples:
        >>> float(hz_to_mel(1000.0))
        15.0
    """
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3.0)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`.

    Args:
        mel: Mels.

    Returns:
        Frequencies in Hz, same shape as ``mel``.

    Examples:
        >>> round(float(mel_to_hz(hz_to_mel(4321.0))), 6)
        4321.0
    """
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3.0)
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


@functools.lru_cache(maxsize=8)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return (MEL_FILTER_PEAK * np.maximum(0.0, np.minimum(rising, falling))).astype(np.float32)


def mel_filterbank(cfg: AudioConfig) -> np.ndarray:
    """Mel projection matrix from linear STFT bins to mel bands.

    Triangular filters on the Slaney mel scale, ``n_mels + 2`` edges evenly spaced in mels
    between ``fmin`` and ``fmax``; each filter rises from 0 at its lower edge to
    :data:`MEL_FILTER_PEAK` at its centre and falls to 0 at its upper edge. This is
    ``0.5 * librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm=None)``.

    Args:
        cfg: Audio settings (``sample_rate``, ``n_fft``, ``n_mels``, ``fmin``, ``fmax``).

    Returns:
        Weights, shape ``(n_mels, n_fft // 2 + 1)``, float32 (a fresh, writable copy).

    Examples:
        >>> fb = mel_filterbank(AudioConfig())
        >>> fb.shape, float(fb.max()) <= 0.5
        ((64, 257), True)
    """
    return _mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, float(cfg.fmin), float(cfg.fmax)).copy()


def peak_normalize(chunks: np.ndarray) -> np.ndarray:
    """Scale each chunk so its largest absolute sample is 1 (never by more than ``1 / PEAK_FLOOR``).

    Args:
        chunks: Array ``(n_chunks, n_samples)``.

    Returns:
        The scaled chunks, float32, same shape.

    Examples:
        >>> peak_normalize(np.array([[0.25, -0.5]])).tolist()
        [[0.5, -1.0]]
    """
    chunks = np.asarray(chunks, dtype=np.float32)
    peak = np.max(np.abs(chunks), axis=-1, keepdims=True)
    return chunks / np.maximum(peak, np.float32(PEAK_FLOOR))


def stft_magnitude(chunks: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """Normalized STFT magnitude of chunks: the reference implementation of the MCU's STFT.

    No peak normalization is applied here (see :func:`compute_features` for the full recipe).

    Args:
        chunks: Array ``(n_chunks, cfg.chunk_samples)``.
        cfg: Audio settings.

    Returns:
        ``|STFT| / (n_fft / 4)``, shape ``(n_chunks, n_fft // 2 + 1, spec_width)``, float32.

    Raises:
        ValueError: The chunks do not have ``cfg.chunk_samples`` samples.

    Examples:
        >>> cfg = AudioConfig()
        >>> t = np.arange(cfg.chunk_samples) / cfg.sample_rate
        >>> sine = np.sin(2 * np.pi * 100 * cfg.sample_rate / cfg.n_fft * t)  # on bin 100
        >>> round(float(stft_magnitude(sine[None], cfg)[0, 100, 0]), 4)
        1.0
    """
    chunks = np.asarray(chunks, dtype=np.float32)
    if chunks.ndim != 2 or chunks.shape[1] != cfg.chunk_samples:
        raise ValueError(f"expected chunks of shape (n, {cfg.chunk_samples}), got {chunks.shape}")
    hop, width = hop_length(cfg), cfg.spec_width
    frames = np.lib.stride_tricks.sliding_window_view(chunks, cfg.n_fft, axis=-1)[:, : (width - 1) * hop + 1 : hop]
    spectrum = np.fft.rfft(frames * hann_window(cfg.n_fft), axis=-1)
    magnitude = np.abs(spectrum).astype(np.float32) * np.float32(4.0 / cfg.n_fft)
    return np.ascontiguousarray(magnitude.transpose(0, 2, 1))


def scale_input(magnitude: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """Apply the fixed host-side input scaling to normalized (mel or linear) magnitudes.

    Args:
        magnitude: Non-negative magnitudes from :func:`stft_magnitude` (optionally mel-projected).
        cfg: Audio settings (``mag_scale``).

    Returns:
        ``magnitude ** INPUT_POWER`` for ``mag_scale`` "pwl"/"none"; the fixed dB map to
        [0, 1] for "db". Float32, same shape.

    Examples:
        >>> [round(float(v), 3) for v in scale_input(np.array([1.0, 0.01, 1e-6]), AudioConfig())]
        [1.0, 0.1, 0.001]
        >>> [round(float(v), 3) for v in scale_input(np.array([1.0, 0.01, 1e-6]), AudioConfig(mag_scale="db"))]
        [1.0, 0.5, 0.0]
    """
    magnitude = np.asarray(magnitude, dtype=np.float32)
    if cfg.mag_scale == "db":
        floor = np.float32(10.0 ** (DB_FLOOR / 20.0))
        db = 20.0 * np.log10(np.maximum(magnitude, floor))
        return np.clip((db - np.float32(DB_FLOOR)) / np.float32(-DB_FLOOR), 0.0, 1.0).astype(np.float32)
    return np.power(magnitude, np.float32(INPUT_POWER))


def compute_features(chunks: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """Turn audio chunks into model inputs (the host part of the frontend).

    Peak-normalizes each chunk, takes the normalized STFT magnitude, projects it to mel
    bands for the ``mel`` frontend and applies the fixed input scaling; see the module
    docstring for every number.

    Args:
        chunks: Array ``(n_chunks, cfg.chunk_samples)`` from :func:`~birdnet_stm32.audio.io.chunk_signal`.
        cfg: Audio settings.

    Returns:
        Features, shape ``(n_chunks, *input_shape(cfg))``, float32, non-negative; a full-scale sine
        gives at most 1.0 (``[0, 1]`` always for ``mag_scale="db"``; ``hybrid`` never exceeds
        ``sqrt(2)``).

    Raises:
        ValueError: The chunks do not have ``cfg.chunk_samples`` samples.

    Examples:
        >>> cfg = AudioConfig(frontend="mel")
        >>> compute_features(np.zeros((2, cfg.chunk_samples)), cfg).shape
        (2, 64, 256, 1)
    """
    chunks = np.asarray(chunks, dtype=np.float32)
    if chunks.ndim != 2 or chunks.shape[1] != cfg.chunk_samples:
        raise ValueError(f"expected chunks of shape (n, {cfg.chunk_samples}), got {chunks.shape}")
    out = np.empty((len(chunks), *input_shape(cfg)), dtype=np.float32)
    fb = mel_filterbank(cfg) if cfg.frontend == "mel" else None
    for start in range(0, len(chunks), _BATCH):
        magnitude = stft_magnitude(peak_normalize(chunks[start : start + _BATCH]), cfg)
        if fb is not None:
            magnitude = np.einsum("mf,nft->nmt", fb, magnitude, optimize=True)
        out[start : start + _BATCH, ..., 0] = scale_input(magnitude, cfg)
    return out


def frontend_contract(cfg: AudioConfig) -> dict[str, Any]:
    """Every number the MCU needs to compute the same model input as the host.

    Written into ``model_config.json`` under ``"frontend"`` by the trainer.

    Args:
        cfg: Audio settings.

    Returns:
        A JSON-ready dict: sample rate, chunk length, peak normalization, STFT (window
        name and formula, hop, centring and padding, frame count, magnitude normalization),
        mel settings (and where the projection runs), input scaling, frontend, ``mag_scale``
        and input shape.

    Examples:
        >>> c = frontend_contract(AudioConfig())
        >>> c["stft"]["hop_length"], c["stft"]["magnitude_norm"], c["input_shape"]
        (257, 128.0, [257, 256, 1])
    """
    if cfg.mag_scale == "db":
        scaling = {
            "kind": "db",
            "floor_db": DB_FLOOR,
            "formula": f"v = clip((20*log10(max(S, {10 ** (DB_FLOOR / 20):g})) + {-DB_FLOOR:g}) / {-DB_FLOOR:g}, 0, 1)",
        }
    else:
        scaling = {
            "kind": "power",
            "exponent": INPUT_POWER,
            "formula": f"v = S ** {INPUT_POWER:g}",
            "then_in_graph": "piecewise-linear compression" if cfg.mag_scale == "pwl" else "nothing",
        }
    return {
        "feature_version": FEATURE_VERSION,
        "frontend": cfg.frontend,
        "mag_scale": cfg.mag_scale,
        "sample_rate": cfg.sample_rate,
        "chunk_samples": cfg.chunk_samples,
        "chunk_duration_s": cfg.chunk_duration,
        "peak_normalization": {"floor": PEAK_FLOOR, "formula": f"x = x / max(max(abs(x)), {PEAK_FLOOR:g})"},
        "stft": {
            "n_fft": cfg.n_fft,
            "window": "hann (periodic)",
            "window_formula": "w[n] = 0.5 - 0.5*cos(2*pi*n/n_fft), n = 0..n_fft-1",
            "hop_length": hop_length(cfg),
            "hop_formula": "floor((chunk_samples - n_fft) / (n_frames - 1))",
            "n_frames": cfg.spec_width,
            "center": False,
            "padding": "none",
            "frame_formula": "frame t = samples t*hop .. t*hop + n_fft - 1, t = 0..n_frames-1",
            "n_bins": cfg.n_fft // 2 + 1,
            "magnitude_norm": cfg.n_fft / 4,
            "magnitude_formula": "S = |rfft(frame * w)| / (n_fft / 4)",
        },
        "mel": {
            "n_mels": cfg.n_mels,
            "fmin": cfg.fmin,
            "fmax": cfg.fmax,
            "scale": "slaney",
            "filters": f"triangular, peak {MEL_FILTER_PEAK:g} (= {MEL_FILTER_PEAK:g} * librosa norm=None)",
            "applied": "host, before input scaling" if cfg.frontend == "mel" else "in-graph, trainable",
        },
        "input_scaling": scaling,
        "input_shape": list(input_shape(cfg)),
        "layout": "(frequency ascending, time, 1)",
    }
