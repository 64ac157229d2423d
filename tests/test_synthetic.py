"""Synthetic demo data: determinism, layout, reuse, the CLI, and that the classes are learnable but not trivial."""

import json

import numpy as np
import pytest
import soundfile as sf

from birdnet_stm32.audio.io import load_audio
from birdnet_stm32.cli import main
from birdnet_stm32.config import AudioConfig, DataConfig
from birdnet_stm32.data.dataset import discover, prepare_datasets
from birdnet_stm32.data.synthetic import MANIFEST, SPECIES, DemoDataConfig, make_clip, make_demo_dataset
from birdnet_stm32.errors import UserError

TINY = DemoDataConfig(clips_per_class=2, duration_range=(1.0, 1.5))


def folder_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.wav"))}


def test_same_settings_give_identical_files_and_another_seed_differs(tmp_path):
    a = make_demo_dataset(tmp_path / "a", TINY)
    make_demo_dataset(tmp_path / "b", TINY)
    make_demo_dataset(tmp_path / "c", DemoDataConfig(clips_per_class=2, duration_range=(1.0, 1.5), seed=99))

    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert folder_bytes(tmp_path / "a").keys() == folder_bytes(tmp_path / "c").keys()
    assert folder_bytes(tmp_path / "a") != folder_bytes(tmp_path / "c")
    assert a.files == 14 and not a.reused
    assert "14 WAV files" in str(a)


def test_layout_at_least_six_species_plus_optional_noise(tmp_path):
    make_demo_dataset(tmp_path / "with", TINY)
    make_demo_dataset(tmp_path / "without", DemoDataConfig(clips_per_class=2, duration_range=(1.0, 1.5),
                                                           noise_class=False))  # fmt: skip
    with_noise = discover(tmp_path / "with")
    assert len(SPECIES) >= 6
    assert with_noise.classes == sorted(SPECIES)  # the noise folder is not a class
    assert with_noise.counts()["noise"] == 2
    assert not (tmp_path / "without" / "noise").exists()
    path = tmp_path / "with" / "trilling_wren" / "trilling_wren_001.wav"
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
    assert 1.0 <= info.duration <= 1.5


def test_clips_vary_in_level_duration_and_content():
    cfg = DemoDataConfig()
    clips = [make_clip(cfg, k, i) for k in range(7) for i in range(3)]
    peaks_db = [20 * np.log10(np.abs(c).max()) for c in clips]
    durations = [len(c) / cfg.sample_rate for c in clips]
    assert all(-20.1 <= p <= -2.9 for p in peaks_db) and np.std(peaks_db) > 2
    assert all(3.0 <= d <= 6.0 for d in durations) and np.std(durations) > 0.3
    assert not np.array_equal(make_clip(cfg, 0, 0), make_clip(cfg, 0, 1))


def test_rerun_reuses_a_complete_folder_and_regenerates_on_new_settings(tmp_path):
    out = tmp_path / "demo"
    make_demo_dataset(out, DemoDataConfig(clips_per_class=3, duration_range=(1.0, 1.0)))
    stamp = (out / "noise" / "noise_000.wav").stat().st_mtime_ns

    again = make_demo_dataset(out, DemoDataConfig(clips_per_class=3, duration_range=(1.0, 1.0)))
    assert again.reused and (out / "noise" / "noise_000.wav").stat().st_mtime_ns == stamp

    fewer = make_demo_dataset(out, DemoDataConfig(clips_per_class=2, duration_range=(1.0, 1.0)))
    assert not fewer.reused and not (out / "noise" / "noise_002.wav").exists()
    assert len(json.loads((out / MANIFEST).read_text())["files"]) == 14 == len(list(out.rglob("*.wav")))

    (out / "noise" / "noise_000.wav").unlink()  # incomplete folder: regenerated
    assert not make_demo_dataset(out, DemoDataConfig(clips_per_class=2, duration_range=(1.0, 1.0))).reused
    assert (out / "noise" / "noise_000.wav").exists()


def test_refuses_a_non_empty_folder_that_is_not_a_demo_dataset(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    with pytest.raises(UserError, match="not a demo dataset"):
        make_demo_dataset(tmp_path / "mine", TINY)
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "precious"


def test_cli_make_demo_data(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["make-demo-data", "--out", str(out), "--clips-per-class", "2", "--seed", "5", "--no-noise-class"]) == 0
    assert "12 WAV files" in capsys.readouterr().out
    assert not (out / "noise").exists() and len(list(out.rglob("*.wav"))) == 12
    assert load_audio(out / "harmonic_hooter" / "harmonic_hooter_000.wav", 22050).size > 0


@pytest.mark.parametrize("argv", [["--clips-per-class", "1"], ["--out-is-a-file"]])
def test_cli_make_demo_data_bad_input_exits_2(tmp_path, capsys, argv):
    target = tmp_path / "x"
    if argv == ["--out-is-a-file"]:
        target.write_text("file")
        argv = []
    assert main(["make-demo-data", "--out", str(target), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("birdnet-stm32 make-demo-data: error:") and err.count("\n") == 1


@pytest.mark.slow
def test_species_are_separable_from_features_but_not_by_a_trivial_rule(tmp_path):
    """A linear probe on time-pooled mel statistics learns the demo set; the overall input level does not."""
    from sklearn.linear_model import LogisticRegression

    make_demo_dataset(tmp_path / "demo", DemoDataConfig(clips_per_class=16))
    audio = AudioConfig(frontend="mel")
    train, val = prepare_datasets(tmp_path / "demo", audio, DataConfig(cache_dir=str(tmp_path / "c"), workers=1,
                                                                       val_fraction=0.3), seed=0)  # fmt: skip

    def pooled(f):
        x = f.x[..., 0]
        return np.concatenate([x.mean(axis=2), x.max(axis=2), x.std(axis=2)], axis=1)

    def label(f):
        return np.where(f.y.sum(axis=1) > 0, f.y.argmax(axis=1), f.y.shape[1])

    probe = LogisticRegression(max_iter=2000).fit(pooled(train), label(train))
    accuracy = float((probe.predict(pooled(val)) == label(val)).mean())
    assert 0.75 <= accuracy
    # loudness alone (the level of each chunk) says nothing about the species
    level = LogisticRegression(max_iter=2000).fit(train.x.mean(axis=(1, 2, 3))[:, None], label(train))
    assert (level.predict(val.x.mean(axis=(1, 2, 3))[:, None]) == label(val)).mean() < 0.5
