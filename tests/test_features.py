"""Host-side spectrograms: librosa parity, fixed scaling, int8 survival of quiet content, the MCU contract."""

import json

import librosa
import numpy as np
import pytest

from birdnet_stm32.audio.features import (
    compute_features,
    frontend_contract,
    hop_length,
    input_shape,
    mel_filterbank,
    stft_magnitude,
)
from birdnet_stm32.config import AudioConfig
from birdnet_stm32.data.synthetic import DemoDataConfig, make_clip

SMALL = AudioConfig(sample_rate=16000, chunk_duration=1.0, n_fft=256, spec_width=64, n_mels=32, fmax=8000)


def tone(cfg, freq, amp=1.0, phase=0.0):
    t = np.arange(cfg.chunk_samples) / cfg.sample_rate
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


@pytest.mark.parametrize("cfg", [AudioConfig(), SMALL], ids=["default", "small"])
def test_numpy_stft_matches_librosa(cfg):
    rng = np.random.default_rng(0)
    chirp = librosa.chirp(fmin=200, fmax=cfg.sample_rate / 2.5, sr=cfg.sample_rate, length=cfg.chunk_samples)
    chunks = np.stack([0.3 * rng.standard_normal(cfg.chunk_samples), chirp]).astype(np.float32)

    ours = stft_magnitude(chunks, cfg)
    ref = np.abs(librosa.stft(chunks, n_fft=cfg.n_fft, hop_length=hop_length(cfg), window="hann", center=False))
    assert ours.shape == (2, cfg.n_fft // 2 + 1, cfg.spec_width)
    assert ref.shape[-1] == cfg.spec_width  # the hop rule gives librosa exactly spec_width frames too
    np.testing.assert_allclose(ours, ref / (cfg.n_fft / 4), atol=2e-6)


def test_hop_spreads_frames_over_the_whole_chunk():
    for cfg in (AudioConfig(), SMALL, AudioConfig(chunk_duration=2.0, spec_width=128)):
        hop = hop_length(cfg)
        last_frame_end = (cfg.spec_width - 1) * hop + cfg.n_fft
        assert last_frame_end <= cfg.chunk_samples < last_frame_end + cfg.spec_width - 1


def test_input_shapes():
    assert input_shape(AudioConfig(frontend="mel")) == (64, 256, 1)
    assert input_shape(AudioConfig(frontend="hybrid", n_fft=256)) == (129, 256, 1)
    for frontend in ("mel", "hybrid"):
        cfg = AudioConfig(frontend=frontend, sample_rate=16000, chunk_duration=1.0, n_fft=256, spec_width=64,
                          n_mels=32, fmax=8000)  # fmt: skip
        assert compute_features(np.zeros((3, cfg.chunk_samples)), cfg).shape == (3, *input_shape(cfg))


def test_mel_filterbank_matches_librosa_unit_peak_triangles_halved():
    for cfg in (AudioConfig(), SMALL):
        ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin,
                                  fmax=cfg.fmax, htk=False, norm=None)  # fmt: skip
        np.testing.assert_allclose(mel_filterbank(cfg), 0.5 * ref, atol=1e-6)


def test_full_scale_sine_lands_at_or_below_one():
    cfg = AudioConfig()
    on_bin = 100 * cfg.sample_rate / cfg.n_fft
    sweep = np.geomspace(200, 10000, 60)
    chunks = np.stack([tone(cfg, f, phase=i) for i, f in enumerate([on_bin, *sweep])])

    magnitude = stft_magnitude(chunks, cfg)
    assert magnitude[0, 100, 5:-5].mean() == pytest.approx(1.0, abs=1e-3)  # on-bin sine gives exactly 1
    assert magnitude.max() <= 1.0 + 1e-4
    assert (mel_filterbank(cfg) @ magnitude).max() <= 1.0
    for frontend in ("mel", "hybrid"):
        for mag_scale in ("pwl", "db"):
            features = compute_features(chunks, AudioConfig(frontend=frontend, mag_scale=mag_scale))
            assert 0.9 <= features.max() <= 1.0 + 1e-4, (frontend, mag_scale)
            assert features.min() >= 0.0


def test_peak_normalization_makes_features_level_independent():
    cfg = AudioConfig(frontend="mel")
    rng = np.random.default_rng(1)
    x = (tone(cfg, 3000, 0.5) + 0.05 * rng.standard_normal(cfg.chunk_samples)).astype(np.float32)
    np.testing.assert_allclose(compute_features(x[None] * 0.01, cfg), compute_features(x[None], cfg), atol=1e-5)


def quantize_int8(values, lo, hi):
    """Asymmetric int8 as TFLite calibrates an input: [lo, hi] (nudged to include 0) onto -128..127."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    zero_point = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return np.clip(np.round(values / scale) + zero_point, -128, 127).astype(np.int8), zero_point


@pytest.mark.parametrize("frontend", ["hybrid", "mel"])
@pytest.mark.parametrize("mag_scale", ["pwl", "db"])
def test_quiet_tone_60db_below_peak_survives_int8_input_quantization(frontend, mag_scale):
    cfg = AudioConfig(frontend=frontend, mag_scale=mag_scale)
    # "typical data" for calibration: demo clips (calls in pink/wind noise at random SNR and level)
    demo = DemoDataConfig(duration_range=(3.0, 3.0))
    calibration = np.stack([make_clip(demo, k, i)[: cfg.chunk_samples] for k in range(6) for i in range(2)])
    calibration_features = compute_features(calibration, cfg)
    lo, hi = float(calibration_features.min()), float(calibration_features.max())

    loud, quiet = 2000.0, 6000.0
    probe = tone(cfg, loud, 1.0) + tone(cfg, quiet, 10 ** (-60 / 20))
    features = compute_features(probe[None], cfg)[0, ..., 0]
    quiet_bin = int(round(quiet * cfg.n_fft / cfg.sample_rate))
    quiet_row = quiet_bin if frontend == "hybrid" else int(np.argmax(mel_filterbank(cfg)[:, quiet_bin]))
    q, zero_point = quantize_int8(features, lo, hi)
    assert (q[quiet_row].astype(int) - zero_point >= 1).all()

    # the same check fails for a plain linear magnitude: this is what the input scaling is for
    linear = stft_magnitude(probe[None], cfg)[0]
    linear_cal = stft_magnitude(calibration / np.abs(calibration).max(axis=1, keepdims=True), cfg)
    q_lin, zp_lin = quantize_int8(linear, float(linear_cal.min()), float(linear_cal.max()))
    assert (q_lin[quiet_bin].astype(int) - zp_lin == 0).all()


def test_frontend_contract_is_complete_and_reproducible_from_its_numbers():
    cfg = AudioConfig()
    contract = json.loads(json.dumps(frontend_contract(cfg)))  # JSON-ready
    stft = contract["stft"]
    assert contract["input_shape"] == list(input_shape(cfg))
    assert stft["n_frames"] == cfg.spec_width and stft["hop_length"] == hop_length(cfg)

    # an independent implementation that only reads the contract (what the MCU does)
    rng = np.random.default_rng(3)
    x = (0.2 * rng.standard_normal(contract["chunk_samples"])).astype(np.float32)
    x = x / max(np.abs(x).max(), contract["peak_normalization"]["floor"])
    n_fft, hop = stft["n_fft"], stft["hop_length"]
    assert stft["center"] is False and stft["padding"] == "none"
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    frames = np.stack([x[t * hop : t * hop + n_fft] for t in range(stft["n_frames"])])
    spectrum = np.abs(np.fft.rfft(frames * window, axis=1)).T / stft["magnitude_norm"]
    expected = spectrum ** contract["input_scaling"]["exponent"]

    np.testing.assert_allclose(compute_features(x[None], cfg)[0, ..., 0], expected, atol=1e-5)
    assert contract["mel"]["applied"].startswith("in-graph")
    assert frontend_contract(AudioConfig(mag_scale="db"))["input_scaling"]["kind"] == "db"


def test_wrong_chunk_length_is_rejected():
    with pytest.raises(ValueError, match="expected chunks of shape"):
        compute_features(np.zeros((1, 100)), AudioConfig())
