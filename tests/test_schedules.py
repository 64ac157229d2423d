import math

import keras
import numpy as np
import pytest

from birdnet_stm32.training.schedules import Constant, OneCycle, WarmupCosine, build_schedule, lr_curve


def test_warmup_cosine_shape():
    s = build_schedule("cosine", 1e-2, steps_per_epoch=10, epochs=10, warmup_epochs=2)
    lr = lr_curve(s, 100)
    assert s.warmup_steps == 20
    assert lr[0] == pytest.approx(1e-4, rel=1e-4)  # warmup_start = 1 % of peak
    assert np.all(np.diff(lr[:21]) > 0), "warmup must rise"
    assert lr[20] == pytest.approx(1e-2, rel=1e-5)
    assert lr.max() == pytest.approx(1e-2, rel=1e-5)
    assert np.all(np.diff(lr[20:]) <= 1e-12), "decay must not rise"
    assert lr[-1] < 0.02 * 1e-2


def test_warmup_is_capped_to_a_fifth_of_the_run():
    s = build_schedule("cosine", 1e-3, steps_per_epoch=10, epochs=5, warmup_epochs=10)
    assert s.warmup_steps == 10


def test_onecycle_peaks_at_pct_start():
    s = OneCycle(0.1, total_steps=200, pct_start=0.25)
    lr = lr_curve(s, 200)
    assert int(np.argmax(lr)) == 50
    assert lr[0] == pytest.approx(0.1 / 25, rel=1e-5)
    assert lr[-1] < lr[0]


def test_constant_schedule():
    lr = lr_curve(Constant(3e-4), 50)
    np.testing.assert_allclose(lr, 3e-4, rtol=1e-6)


@pytest.mark.parametrize("schedule", [WarmupCosine(1e-3, 100, 10), OneCycle(1e-3, 100), Constant(1e-3)])
def test_schedule_serializes_and_drives_an_optimizer(schedule, tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss="mse")
    model.fit(np.ones((8, 3)), np.zeros((8, 2)), epochs=1, batch_size=4, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert type(
        loaded.optimizer.learning_rate_schedule
        if hasattr(loaded.optimizer, "learning_rate_schedule")
        else loaded.optimizer._learning_rate
    ) is type(schedule)
    assert int(loaded.optimizer.iterations) == 2
    expected = float(schedule(2))
    assert float(loaded.optimizer.learning_rate) == pytest.approx(expected, rel=1e-6)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("linear", 1e-3, 10, 1)
    with pytest.raises(ValueError, match="positive"):
        build_schedule("cosine", math.nan, 10, 1)
