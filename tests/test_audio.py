"""Audio input: decoding every supported format, down-mixing, resampling, chunking and the silence rule."""

import numpy as np
import pytest
import soundfile as sf

from birdnet_stm32.audio.io import (
    SUPPORTED_EXTENSIONS,
    TAIL_FRACTION,
    AudioDecodeError,
    chunk_levels_db,
    chunk_signal,
    load_audio,
    load_chunks,
)
from birdnet_stm32.config import AudioConfig
from birdnet_stm32.errors import UserError

FORMATS = {
    ".wav": {"format": "WAV", "subtype": "PCM_16"},
    ".flac": {"format": "FLAC", "subtype": "PCM_16"},
    ".ogg": {"format": "OGG", "subtype": "VORBIS"},
    ".mp3": {"format": "MP3", "subtype": "MPEG_LAYER_III"},
}


def sine(freq, seconds, sr, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(y, sr):
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return np.argmax(spectrum) * sr / len(y)


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_decodes_each_format_to_mono_at_target_rate(tmp_path, ext):
    if ext not in SUPPORTED_EXTENSIONS:
        pytest.skip(f"{ext} not decodable by the installed libsndfile")
    left, right = sine(1000, 2.0, 44100), sine(3000, 2.0, 44100, amp=0.25)
    path = tmp_path / f"clip{ext}"
    sf.write(path, np.stack([left, right], axis=1), 44100, **FORMATS[ext])

    y = load_audio(path, 22050)

    assert y.dtype == np.float32 and y.ndim == 1
    # lossy codecs add encoder delay/padding of a few ms
    assert abs(len(y) - 44100) <= (0 if ext in (".wav", ".flac") else 2500)
    # down-mix = channel mean: the 1 kHz tone (0.5) and the 3 kHz tone (0.25) are both present at half amplitude
    spectrum = np.abs(np.fft.rfft(y[2000:20000] * np.hanning(18000))) / (18000 / 4)
    freqs = np.fft.rfftfreq(18000, 1 / 22050)
    at = lambda f: spectrum[np.argmin(np.abs(freqs - f))]  # noqa: E731
    assert at(1000) == pytest.approx(0.25, rel=0.1)
    assert at(3000) == pytest.approx(0.125, rel=0.15)


def test_mp3_supported_with_modern_libsndfile():
    major, minor = (int(p) for p in sf.__libsndfile_version__.split(".")[:2])
    assert (".mp3" in SUPPORTED_EXTENSIONS) == ((major, minor) >= (1, 1))


def test_resampling_keeps_level_and_removes_content_above_new_nyquist(tmp_path):
    path = tmp_path / "hi.wav"
    sf.write(path, sine(1000, 1.0, 48000) + sine(15000, 1.0, 48000), 48000, subtype="FLOAT")

    y = load_audio(path, 22050)

    assert len(y) == 22050
    body = y[500:-500]
    assert dominant_hz(body, 22050) == pytest.approx(1000, abs=3)
    assert np.sqrt(np.mean(body**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)  # only the 1 kHz tone survives


def test_same_rate_is_not_resampled(tmp_path):
    path = tmp_path / "same.wav"
    data = sine(440, 0.5, 22050)
    sf.write(path, data, 22050, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, 22050), data)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.wav", b"RIFF\x00\x00not really audio at all" * 10, "cannot decode"),
        ("empty.flac", b"", "cannot decode"),
        ("notes.txt", b"hello", "unsupported audio format"),
    ],
)
def test_unreadable_files_raise_decode_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioDecodeError, match=message) as info:
        load_audio(path, 22050)
    assert str(path) in str(info.value)
    assert isinstance(info.value, UserError)


def test_missing_nan_and_zero_length_files(tmp_path):
    with pytest.raises(AudioDecodeError, match="does not exist"):
        load_audio(tmp_path / "nope.wav", 22050)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.0, np.nan, 0.1], np.float32), 22050, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="non-finite"):
        load_audio(nan, 22050)
    empty = tmp_path / "zero.wav"
    sf.write(empty, np.zeros(0, np.float32), 22050)
    with pytest.raises(AudioDecodeError, match="no audio samples"):
        load_audio(empty, 22050)


CFG = AudioConfig(sample_rate=1000, chunk_duration=1.0, silence_db=0.0)


def ramp(n):
    return np.arange(n, dtype=np.float32) + 1


def test_chunking_without_overlap_and_end_aligned_tail():
    y = ramp(2600)  # 2 full chunks + 600 samples (> TAIL_FRACTION of a chunk)
    chunks = chunk_signal(y, CFG)
    assert chunks.shape == (3, 1000)
    np.testing.assert_array_equal(chunks[:, 0], [1, 1001, 1601])  # last chunk ends at the last sample
    np.testing.assert_array_equal(chunks[-1, -1], 2600)


def test_short_tail_is_not_given_its_own_chunk():
    y = ramp(2000 + int(TAIL_FRACTION * 1000))
    assert chunk_signal(y, CFG).shape == (2, 1000)


def test_overlap_sets_the_step():
    cfg = AudioConfig(sample_rate=1000, chunk_duration=1.0, chunk_overlap=0.5, silence_db=0.0)
    chunks = chunk_signal(ramp(2000), cfg)
    np.testing.assert_array_equal(chunks[:, 0], [1, 501, 1001])


def test_short_recordings_are_zero_padded():
    chunks = chunk_signal(ramp(300), CFG)
    assert chunks.shape == (1, 1000)
    np.testing.assert_array_equal(chunks[0, :300], ramp(300))
    assert not chunks[0, 300:].any()


def test_silence_rule_drops_quiet_chunks_relative_to_loudest():
    rng = np.random.default_rng(0)
    loud = 0.5 * rng.standard_normal(1000)
    medium = 0.5 * 10 ** (-30 / 20) * rng.standard_normal(1000)  # 30 dB below the loudest
    quiet = 0.5 * 10 ** (-50 / 20) * rng.standard_normal(1000)  # 50 dB below
    y = np.concatenate([quiet, loud, medium, np.zeros(1000)]).astype(np.float32)

    kept = chunk_signal(y, AudioConfig(sample_rate=1000, chunk_duration=1.0, silence_db=40.0))
    np.testing.assert_array_equal(kept, np.stack([loud, medium]).astype(np.float32))
    assert len(chunk_signal(y, AudioConfig(sample_rate=1000, chunk_duration=1.0, silence_db=60.0))) == 3
    assert len(chunk_signal(y, CFG)) == 4  # silence_db=0 keeps every chunk


def test_silent_recording_keeps_at_least_one_chunk():
    cfg = AudioConfig(sample_rate=1000, chunk_duration=1.0, silence_db=10.0)
    assert len(chunk_signal(np.zeros(3000, np.float32), cfg)) >= 1
    assert len(chunk_signal(np.concatenate([np.zeros(2000), [1e-6] * 1000]).astype(np.float32), cfg)) == 1


def test_chunk_levels_db():
    levels = chunk_levels_db(np.stack([np.full(100, 1.0), np.full(100, 0.1), np.zeros(100)]))
    np.testing.assert_allclose(levels, [0.0, -20.0, -200.0], atol=1e-6)


def test_chunk_signal_rejects_empty_input():
    with pytest.raises(ValueError, match="non-empty"):
        chunk_signal(np.zeros(0, np.float32), CFG)


def test_load_chunks_end_to_end(tmp_path):
    path = tmp_path / "long.ogg"
    sf.write(path, sine(2000, 7.0, 32000), 32000, format="OGG", subtype="VORBIS")
    chunks = load_chunks(path, AudioConfig())
    assert chunks.shape == (3, AudioConfig().chunk_samples)
    assert chunks.dtype == np.float32
