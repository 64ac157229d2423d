"""Dataset discovery, grouped split, feature cache, bad-file handling and the tf.data pipeline."""

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import birdnet_stm32.data.dataset as dataset
from birdnet_stm32.audio.features import compute_features, input_shape
from birdnet_stm32.audio.io import load_chunks
from birdnet_stm32.cli import main
from birdnet_stm32.config import AudioConfig, DataConfig
from birdnet_stm32.data.dataset import (
    NOISE_LABEL,
    DatasetIndex,
    Features,
    cache_entry,
    cache_root,
    discover,
    limit_per_class,
    load_features,
    make_tf_dataset,
    prepare_datasets,
    split_train_val,
)
from birdnet_stm32.errors import UserError

AUDIO = AudioConfig(sample_rate=8000, chunk_duration=0.5, n_fft=128, spec_width=16, n_mels=16, fmin=100, fmax=4000,
                    frontend="mel")  # fmt: skip
FREQS = {"alpha": 500.0, "beta": 1500.0, "gamma": 3000.0, "delta": 2200.0}


def write_clip(path: Path, freq: float, seconds: float = 1.2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 8000)) / 8000
    y = 0.05 * rng.standard_normal(len(t)) + (0.5 * np.sin(2 * np.pi * freq * t) if freq else 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y.astype(np.float32), 8000)
    return path


def make_dataset(root: Path, classes=("alpha", "beta", "gamma"), files_per_class=5, noise=0) -> Path:
    for k, c in enumerate(classes):
        for i in range(files_per_class):
            write_clip(root / c / f"{c}_{i}.wav", FREQS[c], seed=100 * k + i)
    for i in range(noise):
        write_clip(root / "noise" / f"n{i}.wav", 0.0, seed=1000 + i)
    return root


def data_cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), workers=1, **kw)


# --- discovery --------------------------------------------------------------------------------------------------


def test_discover_sorts_classes_and_finds_nested_audio_only(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("gamma", "alpha"), files_per_class=2, noise=1)
    write_clip(root / "alpha" / "site2" / "deep.flac", 500)
    (root / "alpha" / "notes.txt").write_text("not audio")
    (root / "alpha" / ".hidden.wav").write_bytes(b"")
    (root / ".cache").mkdir()
    (root / "README.md").write_text("ignored")

    index = discover(root)

    assert index.classes == ["alpha", "gamma"]
    names = [p.relative_to(root).as_posix() for p in index.files]
    assert names == ["alpha/alpha_0.wav", "alpha/alpha_1.wav", "alpha/site2/deep.flac", "gamma/gamma_0.wav",
                     "gamma/gamma_1.wav", "noise/n0.wav"]  # fmt: skip
    assert index.labels == [0, 0, 0, 1, 1, NOISE_LABEL]
    assert index.counts() == {"alpha": 3, "gamma": 2, "noise": 1}


def test_background_folder_is_noise_in_any_case(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=1)
    write_clip(root / "Background" / "b.wav", 0.0)
    index = discover(root)
    assert index.classes == ["alpha", "beta"] and index.labels[-1] == NOISE_LABEL


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "dataset folder does not exist"),
        (lambda root: root.write_text("x"), "is a file"),
        (lambda root: make_dataset(root, classes=("alpha",), noise=2), r"found 1 class folder\(s\) \(alpha\)"),
        (lambda root: (make_dataset(root, classes=("alpha",)), (root / "beta").mkdir()), "holds no audio file"),
    ],
    ids=["missing", "file", "one-class", "empty-class"],
)
def test_discover_errors_are_one_line_user_errors_naming_the_folder(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(UserError, match=message) as info:
        discover(root)
    assert str(root) in str(info.value) and "\n" not in str(info.value)


def test_forced_classes_keep_label_order_and_reject_unknown_folders(tmp_path, caplog):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=1)
    index = discover(root, classes=["beta", "zeta", "alpha"])
    assert index.classes == ["beta", "zeta", "alpha"]
    assert [index.label_name(i) for i in range(len(index))] == ["beta", "alpha"]
    assert "zeta" in caplog.text  # a class without a folder is only a warning
    with pytest.raises(UserError, match="alpha are not classes of the model"):
        discover(root, classes=["beta", "gamma"])


# --- split ------------------------------------------------------------------------------------------------------


def synthetic_index(n_per_class=(10, 7, 3, 1), noise=4) -> DatasetIndex:
    files, labels = [], []
    for label, n in enumerate(n_per_class):
        files += [Path(f"/data/c{label}/rec{i:02d}.wav") for i in range(n)]
        labels += [label] * n
    files += [Path(f"/data/noise/n{i}.wav") for i in range(noise)]
    labels += [NOISE_LABEL] * noise
    return DatasetIndex(Path("/data"), [f"c{i}" for i in range(len(n_per_class))], files, labels)


def test_split_is_stratified_grouped_and_deterministic():
    index = synthetic_index()
    train, val = split_train_val(index, 0.25, seed=7)

    assert not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == sorted(index.files)
    val_counts = val.counts()
    assert val_counts == {"c0": 2, "c1": 2, "c2": 1, "c3": 0, "noise": 1}  # round(0.25 n), >= 1 if n >= 2
    again = split_train_val(index, 0.25, seed=7)
    assert again[1].files == val.files
    others = {tuple(split_train_val(index, 0.25, seed=s)[1].files) for s in range(5)}
    assert len(others) > 1  # the seed matters


def test_split_ignores_listing_order_and_root_location():
    index = synthetic_index()
    _, val = split_train_val(index, 0.3, seed=3)
    order = list(range(len(index)))
    random.Random(0).shuffle(order)
    _, val_shuffled = split_train_val(index.subset(order), 0.3, seed=3)
    assert sorted(val_shuffled.files) == sorted(val.files)
    moved = DatasetIndex(Path("/elsewhere"), index.classes, [Path("/elsewhere") / p.relative_to("/data")
                                                            for p in index.files], index.labels)  # fmt: skip
    _, val_moved = split_train_val(moved, 0.3, seed=3)
    assert [p.relative_to("/elsewhere") for p in val_moved.files] == [p.relative_to("/data") for p in val.files]


def test_limit_per_class_is_seeded():
    index = synthetic_index()
    small = limit_per_class(index, 2, seed=1)
    assert small.counts() == {"c0": 2, "c1": 2, "c2": 2, "c3": 1, "noise": 2}
    assert limit_per_class(index, 2, seed=1).files == small.files
    assert limit_per_class(index, 0, seed=1) is index


# --- features and cache -----------------------------------------------------------------------------------------


def test_load_features_labels_groups_and_values(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=2, noise=1)
    index = discover(root)
    feats = load_features(index, AUDIO, data_cfg(tmp_path), progress=False)

    assert feats.x.shape[1:] == input_shape(AUDIO) and feats.x.dtype == np.float32
    assert feats.classes == ["alpha", "beta"] and len(feats.files) == 5
    chunks_per_file = len(load_chunks(index.files[0], AUDIO))
    assert len(feats) == 5 * chunks_per_file
    np.testing.assert_array_equal(feats.groups, np.repeat(np.arange(5), chunks_per_file))
    np.testing.assert_array_equal(feats.y.sum(axis=1), [1] * 4 * chunks_per_file + [0] * chunks_per_file)
    assert feats.chunk_counts() == {"alpha": 2 * chunks_per_file, "beta": 2 * chunks_per_file,
                                    "noise": chunks_per_file}  # fmt: skip
    np.testing.assert_allclose(feats.x[:chunks_per_file], compute_features(load_chunks(index.files[0], AUDIO), AUDIO))


def test_second_run_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=2)
    cfg = data_cfg(tmp_path)
    first = load_features(discover(root), AUDIO, cfg, progress=False)
    assert len(list(Path(cfg.cache_dir).rglob("*.npy"))) == 4

    def no_decoding(*args, **kwargs):
        raise AssertionError("audio was decoded on a cache hit")

    monkeypatch.setattr(dataset, "load_chunks", no_decoding)
    second = load_features(discover(root), AUDIO, cfg, progress=False)
    np.testing.assert_array_equal(second.x, first.x)


def test_cache_key_follows_settings_and_file_identity(tmp_path):
    path = write_clip(tmp_path / "a.wav", 500)
    root = tmp_path / "cache"
    entry = cache_entry(path, AUDIO, root)
    assert cache_entry(path, AUDIO, root) == entry
    assert cache_entry(path, AudioConfig(**{**AUDIO.__dict__, "silence_db": 20.0}), root) != entry
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache_entry(path, AUDIO, root) != entry


def test_stale_and_corrupt_cache_entries_are_rebuilt(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=1)
    cfg = data_cfg(tmp_path)
    first = load_features(discover(root), AUDIO, cfg, progress=False)
    entry = cache_entry(discover(root).files[0], AUDIO, cache_root(cfg))

    entry.write_bytes(b"\x93NUMPY garbage")  # corrupt
    rebuilt = load_features(discover(root), AUDIO, cfg, progress=False)
    np.testing.assert_array_equal(rebuilt.x, first.x)
    np.save(entry, np.zeros((1, 3, 3), np.float32))  # wrong shape
    np.testing.assert_array_equal(load_features(discover(root), AUDIO, cfg, progress=False).x, first.x)

    write_clip(discover(root).files[0], 3000, seconds=2.0)  # the recording changed: new content, new key
    changed = load_features(discover(root), AUDIO, cfg, progress=False)
    assert len(changed) != len(first) or not np.allclose(changed.x, first.x)


def test_corrupt_files_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=2)
    bad = root / "beta" / "broken.wav"
    bad.write_bytes(b"RIFF" + os.urandom(200))
    (root / "alpha" / "empty.flac").write_bytes(b"")

    with caplog.at_level(logging.WARNING):
        feats = load_features(discover(root), AUDIO, data_cfg(tmp_path), progress=False)

    assert sorted(feats.skipped) == sorted([str(bad), str(root / "alpha" / "empty.flac")])
    assert len(feats.files) == 4
    assert str(bad) in caplog.text and "2 of 6 file(s) could not be read" in caplog.text


def test_class_without_readable_audio_is_a_user_error(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("alpha",), files_per_class=2)
    (root / "beta").mkdir()
    (root / "beta" / "x.wav").write_bytes(b"not audio")
    with pytest.raises(UserError, match="class 'beta': none of its 1 file"):
        load_features(discover(root), AUDIO, data_cfg(tmp_path), progress=False)


def test_parallel_workers_give_identical_features(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=3)
    serial = load_features(discover(root), AUDIO, data_cfg(tmp_path / "one"), progress=False)
    parallel = load_features(discover(root), AUDIO, DataConfig(cache_dir=str(tmp_path / "two"), workers=2),
                             progress=False)  # fmt: skip
    np.testing.assert_array_equal(parallel.x, serial.x)
    np.testing.assert_array_equal(parallel.y, serial.y)


def test_unusable_cache_folder_is_a_user_error(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=1)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="feature cache folder is not writable"):
        load_features(discover(root), AUDIO, DataConfig(cache_dir=str(tmp_path / "a_file" / "cache")), progress=False)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("BIRDNET_STM32_CACHE", str(tmp_path / "env"))
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cache_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("BIRDNET_STM32_CACHE")
    assert cache_root(DataConfig()) == Path.home() / ".cache" / "birdnet_stm32"


def test_plain_file_list_gives_unlabeled_features(tmp_path):
    files = [write_clip(tmp_path / f"{i}.wav", 500) for i in range(2)]
    feats = load_features(files, AUDIO, data_cfg(tmp_path), progress=False)
    assert feats.y.shape == (len(feats), 0) and feats.files == [str(f) for f in files]


# --- prepare_datasets -------------------------------------------------------------------------------------------


def test_prepare_datasets_splits_by_recording(tmp_path):
    root = make_dataset(tmp_path / "d", files_per_class=5, noise=2)
    train, val = prepare_datasets(root, AUDIO, data_cfg(tmp_path, val_fraction=0.2), seed=0)
    assert not set(train.files) & set(val.files)
    assert len(train.files) + len(val.files) == 17
    assert {c for c, n in val.chunk_counts().items() if n} == {"alpha", "beta", "gamma", "noise"}
    assert train.classes == val.classes == ["alpha", "beta", "gamma"]
    assert val.groups.max() == len(val.files) - 1


def test_prepare_datasets_with_explicit_validation_folder(tmp_path):
    root = make_dataset(tmp_path / "d", files_per_class=2)
    val_root = make_dataset(tmp_path / "v", classes=("gamma", "alpha"), files_per_class=1)
    train, val = prepare_datasets(root, AUDIO, data_cfg(tmp_path), seed=0, val_dir=val_root)
    assert len(train.files) == 6 and len(val.files) == 2
    assert val.classes == ["alpha", "beta", "gamma"]
    assert val.chunk_counts()["beta"] == 0
    bad_val = make_dataset(tmp_path / "bad", classes=("alpha", "delta"), files_per_class=1)
    with pytest.raises(UserError, match="delta are not classes"):
        prepare_datasets(root, AUDIO, data_cfg(tmp_path), seed=0, val_dir=bad_val)
    with pytest.raises(UserError, match="is the training folder"):
        prepare_datasets(root, AUDIO, data_cfg(tmp_path), seed=0, val_dir=root)


def test_prepare_datasets_needs_recordings_to_hold_out(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("alpha", "beta"), files_per_class=1)
    with pytest.raises(UserError, match="too few recordings"):
        prepare_datasets(root, AUDIO, data_cfg(tmp_path), seed=0)


# --- tf.data ----------------------------------------------------------------------------------------------------


def toy_features(n=10, classes=3) -> Features:
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 6, 1), np.float32)
    y = np.eye(classes, dtype=np.float32)[np.arange(n) % classes]
    return Features(x, y, np.arange(n), [f"{i}.wav" for i in range(n)], [f"c{i}" for i in range(classes)],
                    audio=AUDIO)  # fmt: skip


NO_AUGMENT = DataConfig(mixup_alpha=0.0, time_masks=0, freq_masks=0, gain_db=0.0)


def test_evaluation_pipeline_is_one_ordered_pass():
    feats = toy_features()
    batches = list(make_tf_dataset(feats, 4, training=False, data_cfg=DataConfig(), seed=0).as_numpy_iterator())
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), feats.x)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), feats.y)


def test_training_pipeline_shuffles_repeats_and_keeps_labels_with_inputs():
    feats = toy_features()
    ds = make_tf_dataset(feats, 4, training=True, data_cfg=NO_AUGMENT, seed=1)
    assert tuple(ds.element_spec[0].shape) == (4, 4, 6, 1) and tuple(ds.element_spec[1].shape) == (4, 3)
    batches = list(ds.take(10).as_numpy_iterator())  # more than two epochs: it repeats
    rows = np.concatenate([x[:, 0, 0, 0] for x, _ in batches]).astype(int)
    labels = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(labels, feats.y[rows])
    assert list(rows[:10]) != list(range(10))
    assert set(rows) == set(range(10))
    again = np.concatenate([x[:, 0, 0, 0] for x, _ in make_tf_dataset(
        feats, 4, training=True, data_cfg=NO_AUGMENT, seed=1).take(10).as_numpy_iterator()]).astype(int)  # fmt: skip
    np.testing.assert_array_equal(again, rows)


def test_pipelines_run_their_ops_single_threaded_beside_the_model():
    # Multi-threaded pipeline ops would queue shards into the model's thread pool (measured: 0.89 -> 1.0
    # pipeline efficiency on 2 cores, bench/training.py).
    for training in (True, False):
        ds = make_tf_dataset(toy_features(), 4, training=training, data_cfg=NO_AUGMENT, seed=0)
        assert ds.options().threading.max_intra_op_parallelism == 1


def test_training_augmentation_mixes_masks_and_is_seeded():
    feats = toy_features(n=32)
    cfg = DataConfig(mixup_alpha=0.4, time_masks=1, freq_masks=1, max_mask_fraction=0.5, gain_db=6.0)
    x, y = next(make_tf_dataset(feats, 32, training=True, data_cfg=cfg, seed=2).as_numpy_iterator())
    x2, y2 = next(make_tf_dataset(feats, 32, training=True, data_cfg=cfg, seed=2).as_numpy_iterator())
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)  # mixed targets stay distributions
    assert ((y > 0) & (y < 1)).any()  # some rows are mixed
    assert (x == 0).any() and x.max() > 0  # masks zero some bins
    assert not np.array_equal(x, next(make_tf_dataset(feats, 32, training=True, data_cfg=cfg, seed=3)
                                      .as_numpy_iterator())[0])  # fmt: skip


def test_training_set_smaller_than_a_batch_is_a_user_error():
    with pytest.raises(UserError, match="--batch-size 64"):
        make_tf_dataset(toy_features(), 64, training=True, data_cfg=NO_AUGMENT, seed=0)


# --- CLI --------------------------------------------------------------------------------------------------------


def test_cli_bad_dataset_exits_with_code_2_and_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", classes=("alpha",), files_per_class=1)
    code = main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "need at least two" in err and str(root) in err


def test_training_pipeline_distributes_across_replicas():
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices (set up by conftest.py)")
    strategy = tf.distribute.MirroredStrategy(devices)
    ds = make_tf_dataset(toy_features(n=16), 8, training=True, data_cfg=DataConfig(), seed=0)
    x, y = next(iter(strategy.experimental_distribute_dataset(ds)))
    parts = strategy.experimental_local_results(x)
    assert len(parts) == 2 and all(tuple(p.shape) == (4, 4, 6, 1) for p in parts)
