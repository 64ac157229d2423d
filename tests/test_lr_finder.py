"""The LR range test on real (tiny) Keras models: true per-batch loss, isolation, strategies, mixed precision."""

import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from birdnet_stm32.config import LRFinderConfig
from birdnet_stm32.training.lr_analysis import PEAK_OVER_CONSTANT, LRFinderError, sweep_lrs
from birdnet_stm32.training.lr_finder import LRFinder, find_lr, run_lr_finder

N_CLASSES = 3


def make_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    labels = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    return x, keras.utils.to_categorical(labels, N_CLASSES).astype("float32")


def dense_model(name="dense"):
    """No BatchNorm and no dropout: its loss on a batch can be recomputed exactly."""
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32")(h), name=name)


def bn_dropout_model():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9)(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(0.3)(h)
    return keras.Model(inputs, keras.layers.Dense(N_CLASSES, activation="softmax")(h))


def batches(x, y, batch_size=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def direct_batch_losses(model, x, y, batch_size, steps, loss=keras.losses.categorical_crossentropy):
    """Loss of the untrained model on the batches the (cycled) dataset yields, step by step."""
    n_batches = int(np.ceil(len(x) / batch_size))
    out = []
    for i in range(steps):
        b = i % n_batches
        xb, yb = x[b * batch_size : (b + 1) * batch_size], y[b * batch_size : (b + 1) * batch_size]
        out.append(float(np.mean(loss(yb, model(xb, training=True)))))
    return np.array(out)


# A range so low the weights do not move: every recorded loss must be that batch's own loss under the initial model.
FROZEN = {"min_lr": 1e-12, "max_lr": 1e-11, "num_steps": 24, "progress": False}


def test_defaults_match_the_seed_contract_and_the_config():
    cfg = LRFinderConfig()
    assert (cfg.min_lr, cfg.max_lr, cfg.num_steps, cfg.smoothing) == (1e-7, 1.0, 200, 5)
    finder = LRFinder()
    assert (finder.min_lr, finder.max_lr, finder.num_steps) == (cfg.min_lr, cfg.max_lr, cfg.num_steps)
    import inspect

    for fn in (find_lr, run_lr_finder):
        params = inspect.signature(fn).parameters
        assert (params["min_lr"].default, params["max_lr"].default, params["num_steps"].default) == (1e-7, 1.0, 200)
        assert params["loss_fn"].default == "categorical_crossentropy"
    assert inspect.signature(find_lr).parameters["smoothing"].default == cfg.smoothing
    assert inspect.signature(LRFinder.suggest_lr).parameters["smoothing"].default == 5
    assert list(inspect.signature(LRFinder.plot).parameters) == ["self", "path", "suggested_lr"]


def test_records_the_true_loss_of_every_batch_and_cycles_finite_data():
    keras.utils.set_random_seed(0)
    model = dense_model()
    x, y = make_data(80)  # 5 batches of 16: the 24-step sweep cycles the data almost five times
    result = find_lr(model, batches(x, y), **FROZEN)
    assert result.losses.size == 24
    np.testing.assert_allclose(result.losses, direct_batch_losses(model, x, y, 16, 24), rtol=1e-5)
    assert not np.allclose(result.losses, np.cumsum(result.losses) / np.arange(1, 25))  # not a running mean
    np.testing.assert_allclose(result.lrs, sweep_lrs(1e-12, 1e-11, 24), rtol=1e-5)
    assert result.metadata["batch_size"] == 16 and result.metadata["model_compiled"] is False
    assert result.metadata["optimizer"]["class"] == "Adam"


def test_steps_per_execution_still_records_every_step():
    keras.utils.set_random_seed(0)
    model = dense_model()
    x, y = make_data(80)
    result = find_lr(model, batches(x, y), steps_per_execution=5, **FROZEN)
    assert result.losses.size == 24 and result.metadata["steps_per_execution"] == 5
    np.testing.assert_allclose(result.losses, direct_batch_losses(model, x, y, 16, 24), rtol=1e-5)
    np.testing.assert_allclose(result.lrs, sweep_lrs(1e-12, 1e-11, 24), rtol=1e-5)


def test_mirrored_strategy_on_two_cpu_devices_records_the_global_batch_loss():
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices (tests/conftest.py splits the CPU)")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = dense_model()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy", steps_per_execution=3)
    x, y = make_data(80)
    result = find_lr(model, batches(x, y), **FROZEN)
    assert result.metadata["replicas"] == 2
    np.testing.assert_allclose(result.losses, direct_batch_losses(model, x, y, 16, 24), rtol=1e-5)
    assert any("keras-team/keras#19246" in w for w in result.warnings)  # spe=3 fell back to 1
    good = find_lr(model, make_data(512), min_lr=1e-4, max_lr=100.0, num_steps=60, seed=0, progress=False,
                   probe_steps=8)  # fmt: skip
    assert good.ok and good.metadata["optimizer"]["class"] == "SGD"
    assert [len(run) for run in good.probes["runs"]] == [8] * len(good.probes["lrs"])  # every replica's step
    assert np.isfinite(good.probes["runs"][0]).all()


def test_sweeps_a_clone_of_the_users_optimizer_and_loss():
    keras.utils.set_random_seed(0)
    model = dense_model()
    sgd = keras.optimizers.SGD(0.05, momentum=0.8, nesterov=True, clipnorm=2.0)
    model.compile(optimizer=sgd, loss="mean_squared_error", metrics=[keras.metrics.CategoricalAccuracy()])
    x, y = make_data(80)
    result = find_lr(model, batches(x, y), **FROZEN)
    info = result.metadata["optimizer"]
    assert info["class"] == "SGD" and info["config"]["momentum"] == 0.8 and info["config"]["nesterov"] is True
    assert info["config"]["clipnorm"] == 2.0 and result.metadata["loss"] == "mean_squared_error"
    mse = keras.losses.mean_squared_error
    np.testing.assert_allclose(result.losses, direct_batch_losses(model, x, y, 16, 24, loss=mse), rtol=1e-5)


def test_loss_weights_of_a_two_output_model_are_kept():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    a = keras.layers.Dense(N_CLASSES, activation="softmax", name="a")(h)
    b = keras.layers.Dense(1, name="b")(h)
    model = keras.Model(inputs, {"a": a, "b": b})
    model.compile(
        optimizer="adam", loss={"a": "categorical_crossentropy", "b": "mse"}, loss_weights={"a": 1.0, "b": 0.0}
    )
    x, y = make_data(80)
    ds = tf.data.Dataset.from_tensor_slices((x, {"a": y, "b": x[:, :1]})).batch(16)
    result = find_lr(model, ds, **FROZEN)
    expected = [
        float(np.mean(keras.losses.categorical_crossentropy(y[(i % 5) * 16 : (i % 5 + 1) * 16],
                                                            model(x[(i % 5) * 16 : (i % 5 + 1) * 16])["a"])))
        for i in range(24)
    ]  # fmt: skip
    np.testing.assert_allclose(result.losses, expected, rtol=1e-5)  # the "b" term has weight 0


def snapshot(model):
    import keras.src.backend.common.global_state as gs
    from tensorflow.python.eager import context

    gen = gs.get_global_attribute("global_seed_generator")
    return {
        "variables": [v.numpy().copy() for v in model.variables],
        "optimizer": [v.numpy().copy() for v in model.optimizer.variables],
        "iterations": int(model.optimizer.iterations.numpy()),
        "optimizer_object": model.optimizer,
        "lr_object": model.optimizer._learning_rate,
        "compile_config": repr(model.get_compile_config()),
        "metrics": [(m, [v.numpy().copy() for v in m.variables]) for m in model.metrics],
        "train_step_loss": model.compute_loss,
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "keras_seed": None if gen is None else gen.state.numpy().copy(),
        "tf_rng": context.context()._rng.getstate(),
    }


def assert_same(before, after):
    for key in ("variables", "optimizer"):
        assert len(before[key]) == len(after[key])
        for a, b in zip(before[key], after[key], strict=True):
            assert np.array_equal(a, b), key
    for key in ("iterations", "compile_config", "python", "tf_rng"):
        assert before[key] == after[key], key
    for key in ("optimizer_object", "lr_object"):
        assert before[key] is after[key], key
    assert before["train_step_loss"].__func__ is after["train_step_loss"].__func__
    assert np.array_equal(before["numpy"], after["numpy"]) and np.array_equal(before["keras_seed"], after["keras_seed"])
    for (m1, v1), (m2, v2) in zip(before["metrics"], after["metrics"], strict=True):
        assert m1 is m2 and all(np.array_equal(a, b) for a, b in zip(v1, v2, strict=True))


def test_model_optimizer_compile_settings_and_random_states_are_left_bit_identical():
    from birdnet_stm32.training.schedules import WarmupCosine

    keras.utils.set_random_seed(1)
    model = bn_dropout_model()
    model.compile(
        optimizer=keras.optimizers.AdamW(WarmupCosine(1e-2, total_steps=100, warmup_steps=5), weight_decay=1e-3),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=["categorical_accuracy"],
    )
    x, y = make_data(128)
    model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=3, verbose=0)  # optimizer state and iterations > 0
    keras.random.uniform((2,))  # the global Keras seed generator exists
    before = snapshot(model)
    result = find_lr(model, (x, y), min_lr=1e-5, max_lr=10.0, num_steps=40, seed=7, progress=False, probe_steps=8)
    assert result.losses.size > 10 and result.metadata["optimizer"]["class"] == "AdamW"
    assert result.probes and len(result.probes["losses"]) >= 2  # the probes train the clone too
    assert "compute_loss" not in vars(model)
    assert_same(before, snapshot(model))


@pytest.mark.slow
def test_find_lr_then_fit_gives_the_same_weights_as_fit_alone():
    x, y = make_data(256)

    def train(sweep_first):
        keras.utils.set_random_seed(3)
        model = bn_dropout_model()
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="categorical_crossentropy")
        if sweep_first:
            find_lr(model, (x, y), min_lr=1e-5, max_lr=10.0, num_steps=30, progress=False)
            find_lr(model, (x, y), min_lr=1e-5, max_lr=10.0, num_steps=30, seed=11, progress=False, probe_steps=8)
        model.fit(x, y, batch_size=32, epochs=2, shuffle=True, verbose=0)  # shuffling and dropout use the seeds
        return [w.copy() for w in model.get_weights()] + [random.random(), np.random.rand(), keras.random.uniform(())]

    plain, swept = train(False), train(True)
    assert len(plain) == len(swept)
    for a, b in zip(plain, swept, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_gives_the_same_sweep():
    x, y = make_data(256)
    keras.utils.set_random_seed(0)
    model = bn_dropout_model()
    a = find_lr(model, (x, y), min_lr=1e-5, max_lr=10.0, num_steps=30, seed=5, progress=False)
    b = find_lr(model, (x, y), min_lr=1e-5, max_lr=10.0, num_steps=30, seed=5, progress=False)
    c = find_lr(model, (x, y), min_lr=1e-5, max_lr=10.0, num_steps=30, seed=6, progress=False)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.array_equal(a.losses[:20], c.losses[:20])


def test_constant_lr_probes_restart_from_the_starting_weights_with_a_fresh_optimizer():
    keras.utils.set_random_seed(0)
    model = dense_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="categorical_crossentropy")
    x, y = make_data(512)
    result = find_lr(model, batches(x, y, 32), min_lr=1e-4, max_lr=10.0, num_steps=80, seed=0, progress=False,
                     probe_steps=20)  # fmt: skip
    valley = result.suggestions["valley"]
    assert result.probes["lrs"] == result.probe_lrs() and result.probes["lrs"][0] == valley
    assert all(lr < result.suggestions["divergence"] / 2 for lr in result.probes["lrs"][1:])
    expected = []  # each probe replayed: the model's weights, a new SGD with momentum, the batches in order
    for lr in result.probes["lrs"]:
        replay = dense_model()
        replay.set_weights(model.get_weights())
        replay.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss="categorical_crossentropy")
        rows = [slice(32 * (i % 16), 32 * (i % 16 + 1)) for i in range(20)]
        losses = [float(replay.train_on_batch(x[r], y[r])) for r in rows]
        expected.append(losses)
    np.testing.assert_allclose(result.probes["runs"], expected, rtol=1e-4)  # the true loss of every step
    expected = np.mean(np.array(expected)[:, 10:], axis=1)
    np.testing.assert_allclose(result.probes["losses"], expected, rtol=1e-4)
    best, lrs = int(np.argmin(expected)), result.probes["lrs"]
    assert result.recommended_lr == result.probes["picked"]
    assert lrs[max(best - 1, 0)] <= result.recommended_lr <= lrs[min(best + 1, len(lrs) - 1)]  # around the best
    assert result.recommended_peak_lr == pytest.approx(valley * PEAK_OVER_CONSTANT)  # the peak keeps its rule
    assert "constant-LR probes" in result.summary() and result.to_dict()["probes"]["picked"] == result.recommended_lr


def test_divergence_stops_the_sweep_and_nothing_is_suggested_beyond_it():
    keras.utils.set_random_seed(0)
    model = dense_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="categorical_crossentropy")
    result = find_lr(model, make_data(512), min_lr=1e-4, max_lr=1e4, num_steps=120, seed=0, progress=False)
    assert result.stop_reason in ("diverged", "non_finite") and result.losses.size < 120
    assert result.ok, result.error
    top = result.suggestions["divergence"]
    assert all(result.suggestions[k] < top for k in ("valley", "minimum", "steepest"))
    assert result.recommended_lr < result.recommended_peak_lr < top


def test_mixed_precision_skipped_loss_scale_steps_are_not_divergence():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = dense_model()
        big_scale = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3), initial_scale=2.0**40)
        model.compile(optimizer=big_scale, loss="categorical_crossentropy", steps_per_execution=4)
        x, y = make_data(80)
        result = find_lr(model, batches(x, y), **FROZEN)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert result.metadata["dtype_policy"] == "mixed_float16" and result.metadata["optimizer"]["loss_scale"] is True
    assert result.metadata["skipped_steps"] >= 10  # 2**40 overflows float16 gradients until it has halved enough
    assert result.stop_reason == "completed" and result.losses.size == 24
    skipped = result.metadata["skipped_steps"]  # all at the start: applied step i used batch i + skipped
    np.testing.assert_allclose(result.losses, direct_batch_losses(model, x, y, 16, 24 + skipped)[skipped:], rtol=2e-2)


def test_callback_in_a_users_fit_with_a_float_lr():
    keras.utils.set_random_seed(0)
    model = dense_model()
    optimizer = keras.optimizers.SGD(0.01)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    finder = LRFinder(min_lr=1e-3, max_lr=100.0, num_steps=80, progress=False)
    x, y = make_data(512)
    ds = batches(x, y, 32).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=80, callbacks=[finder], shuffle=False, verbose=0)
    np.testing.assert_allclose(finder.lrs, sweep_lrs(1e-3, 100.0, 80)[: len(finder.lrs)], rtol=1e-5)
    assert len(finder.losses) == len(finder.lrs) > 20 and finder.stop_reason == "diverged"
    assert "compute_loss" not in vars(model)
    assert float(optimizer.learning_rate) == pytest.approx(0.01)  # the user's LR is put back
    assert finder.suggest_lr() == finder.result().recommended_lr < finder.result().suggestions["divergence"]


def test_callback_with_a_schedule_lr_puts_the_schedule_back():
    keras.utils.set_random_seed(0)
    model = dense_model()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 100, 0.9)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="categorical_crossentropy", steps_per_execution=4)
    x, y = make_data(512)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # the schedule has already been traced once
    finder = LRFinder(min_lr=1e-4, max_lr=1.0, num_steps=20, progress=False)
    model.fit(batches(x, y, 32).repeat(), epochs=1, steps_per_epoch=20, callbacks=[finder], shuffle=False, verbose=0)
    start = 16  # the first fit ran 512 / 32 optimizer steps
    np.testing.assert_allclose(finder.lrs, sweep_lrs(1e-4, 1.0, 20), rtol=1e-5)  # exact per step, spe=4
    assert model.optimizer._learning_rate is schedule
    assert int(model.optimizer.iterations.numpy()) == start + 20


@pytest.mark.parametrize("user_lr,spe", [("float", 4), ("schedule", 4), ("float", 3), ("schedule", 3)])
def test_recorded_lrs_are_the_lrs_the_optimizer_applied(user_lr, spe):
    """spe=3 on 4 batches per epoch: every epoch ends with a short execution of 1 step."""

    def linear():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [3.0], [0.5]], "float32")
    lr = 0.01 if user_lr == "float" else keras.optimizers.schedules.ExponentialDecay(0.01, 100, 0.9)
    model = linear()
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse", steps_per_execution=spe)
    finder = LRFinder(min_lr=1e-3, max_lr=0.3, num_steps=20, progress=False)
    if spe == 4:
        model.fit(batches(x, y).repeat(), epochs=1, steps_per_epoch=20, callbacks=[finder], shuffle=False, verbose=0)
    else:
        model.fit(x, y, batch_size=16, epochs=10, callbacks=[finder], shuffle=False, verbose=0)
    assert finder.stop_reason == "completed" and len(finder.lrs) == 20
    assert int(model.optimizer.iterations.numpy()) < 20 + spe  # stopped at the end of the sweep
    if user_lr == "float":  # assigned before each execution of spe steps
        assert finder.lrs[:spe] == [finder.lrs[0]] * spe and finder.lrs[spe] > finder.lrs[spe - 1]
    else:  # the sweep schedule: exact per step
        assert np.all(np.diff(finder.lrs) > 0)
    replay = linear()  # the same steps one by one, each with the LR the finder says it ran with
    replay.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    for i, step_lr in enumerate(finder.lrs):
        replay.optimizer.learning_rate = step_lr
        b = i % 4
        replay.train_on_batch(x[16 * b : 16 * (b + 1)], y[16 * b : 16 * (b + 1)])
    np.testing.assert_allclose(replay.get_weights()[0], model.get_weights()[0], rtol=1e-5)


def test_run_lr_finder_returns_the_recommended_constant_lr_and_writes_the_plot(tmp_path):
    keras.utils.set_random_seed(0)
    model = dense_model()
    x, y = make_data(512)
    data = batches(x, y, 32)
    lr = run_lr_finder(model, data, min_lr=1e-5, max_lr=100.0, num_steps=60, plot_path=str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    again = find_lr(model, data, min_lr=1e-5, max_lr=100.0, num_steps=60, progress=False)
    assert lr == again.recommended_lr  # random states are restored, so the same call gives the same sweep
    with pytest.raises(LRFinderError, match="never fell"):
        run_lr_finder(model, data, min_lr=1e-12, max_lr=1e-11, num_steps=20)


def test_progress_bar_shows_step_lr_and_loss(capsys):
    keras.utils.set_random_seed(0)
    find_lr(dense_model(), make_data(64), min_lr=1e-5, max_lr=1e-3, num_steps=12, progress=True)
    err = capsys.readouterr().err
    assert "LR sweep" in err and "lr=" in err and "loss=" in err


def test_bad_inputs_raise_clear_errors():
    model = dense_model()
    x, y = make_data(32)
    with pytest.raises(LRFinderError, match="min_lr"):
        find_lr(model, (x, y), min_lr=0.0)
    with pytest.raises(LRFinderError, match="num_steps"):
        find_lr(model, (x, y), num_steps=5)
    with pytest.raises(LRFinderError, match="probe_steps"):
        find_lr(model, (x, y), probe_steps=2)
    with pytest.raises(LRFinderError, match="single examples"):
        find_lr(model, tf.data.Dataset.from_tensor_slices((x, y)), progress=False)
    with pytest.raises(LRFinderError, match="empty"):
        find_lr(model, batches(x, y).take(0), progress=False)
    with pytest.raises(LRFinderError, match="tf.data.Dataset or numpy"):
        find_lr(model, x, progress=False)
