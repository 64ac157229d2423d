"""The LR-finder analysis (smoothing, divergence rule, suggestion rules, verdict, artifacts) without TensorFlow."""

import csv
import json
import math

import numpy as np
import pytest

from birdnet_stm32.errors import UserError
from birdnet_stm32.training.lr_analysis import (
    PEAK_OVER_CONSTANT,
    SUGGESTION_RULES,
    DivergenceMonitor,
    LRFinderError,
    LRFinderResult,
    _apply_rules,
    check_sweep_args,
    ema,
    noise_sigma,
    probe_scores,
    sweep_lrs,
)


def sweep_curve(n=200, min_lr=1e-7, max_lr=1.0, noise=0.05, seed=0, centre=-3.0, blowup=-0.8, nan_after=None):
    """A typical range-test curve: flat, a sigmoid descent around 10**centre, a blow-up past 10**blowup."""
    lrs = sweep_lrs(min_lr, max_lr, n)
    x = np.log10(lrs)
    clean = 2.3 - 2.0 / (1 + np.exp(-4 * (x - centre))) + np.where(x > blowup, 30 * (x - blowup) ** 2, 0.0)
    losses = clean + np.random.default_rng(seed).normal(0, noise, n)
    if nan_after is not None:
        losses[nan_after:] = np.nan
    return lrs, losses


def test_ema_is_bias_corrected_and_its_lag_is_exact_for_a_linear_trend():
    x = 5.0 + 0.3 * np.arange(60)
    s, lag = ema(x, span=9)
    assert s[0] == x[0] and lag[0] == 0.0
    np.testing.assert_allclose(s, 5.0 + 0.3 * (np.arange(60) - lag), rtol=1e-12)
    assert lag[-1] == pytest.approx((9 - 1) / 2, rel=1e-3)  # long-run lag of an EMA with span N
    flat, _ = ema(np.full(10, 2.5), span=5)
    np.testing.assert_allclose(flat, 2.5)


def test_noise_sigma_is_robust_to_trend_and_spikes():
    rng = np.random.default_rng(1)
    x = np.linspace(2.3, 0.3, 400) + rng.normal(0, 0.08, 400)
    assert noise_sigma(x) == pytest.approx(0.08, rel=0.15)
    x[::50] += 20.0
    assert noise_sigma(x) == pytest.approx(0.08, rel=0.2)


@pytest.mark.parametrize("seed", range(5))
def test_monitor_does_not_stop_on_a_flat_noisy_loss(seed):
    losses = 2.3 + np.random.default_rng(seed).normal(0, 0.1, 200)
    monitor = DivergenceMonitor(span=5)
    assert not any(monitor.update(v) for v in losses)


@pytest.mark.parametrize("offset", [0.0, -5.0, 1e-3])
def test_divergence_rule_works_for_losses_near_or_below_zero(offset):
    """A loss that falls to ~0 (or below, shifted) then blows up: same stop step whatever the offset or scale."""
    lrs, losses = sweep_curve(noise=0.02)
    losses = losses - losses.min() * (offset != 0) + offset  # minimum near `offset`
    stops = []
    for scale in (1.0, 0.001):
        monitor = DivergenceMonitor(span=5)
        stops.append(next(i for i, v in enumerate(losses * scale) if monitor.update(v)))
    assert stops[0] == stops[1]
    assert lrs[stops[0]] > 10**-0.8  # only past the blow-up, never in the descent or near the minimum


def test_a_non_finite_loss_stops_at_once():
    monitor = DivergenceMonitor(span=5)
    assert [monitor.update(v) for v in (2.0, 1.9, float("inf"))] == [None, None, "non_finite"]


def test_suggestions_of_a_good_sweep_sit_where_the_rules_say():
    lrs, losses = sweep_curve()
    r = LRFinderResult.from_sweep(lrs, losses, smoothing=5)
    assert r.ok and r.error is None and r.stop_reason == "diverged"
    s = r.suggestions
    assert set(s) == set(SUGGESTION_RULES)
    # The loss falls around 1e-3 (from ~1e-4 to ~1e-2), bottoms out, and blows up past 10**-0.8.
    low, high = r.valley_floor
    i_min = int(np.argmin(r.smoothed))
    assert low < r.smoothed_lrs[i_min] < high < s["divergence"]
    inside = (r.smoothed_lrs >= low) & (r.smoothed_lrs <= high)
    assert r.smoothed[inside].max() <= r.smoothed.min() + 0.3 * (2.3 - r.smoothed.min()) + 0.05
    assert s["valley"] == pytest.approx(math.sqrt(low * high) / 10)
    assert s["minimum"] == pytest.approx(r.smoothed_lrs[i_min] / 10)
    assert 10**-4 < s["steepest"] <= low  # in the descent that leads to the floor
    assert 10**-0.8 < s["divergence"] < 1.0
    assert r.recommended_lr == s["valley"]
    assert r.recommended_peak_lr == pytest.approx(s["valley"] * PEAK_OVER_CONSTANT) and r.recommended_peak_lr < high


def test_lag_correction_reads_the_smoothed_curve_at_the_right_lr():
    """Heavier smoothing barely moves the suggestions once the lag is accounted for; reading at the raw LR would."""
    lrs, losses = sweep_curve(noise=0.0)
    light = LRFinderResult.from_sweep(lrs, losses, smoothing=1)
    heavy = LRFinderResult.from_sweep(lrs, losses, smoothing=15)
    smoothed, _ = ema(losses[: heavy.smoothed.size], 15)
    uncorrected = _apply_rules(smoothed, lrs[: smoothed.size], lrs, None, "completed", 15)  # read at the raw LR
    for rule in ("valley", "steepest"):
        assert abs(math.log10(heavy.suggestions[rule] / light.suggestions[rule])) < 0.08, rule
        assert math.log10(uncorrected[rule] / light.suggestions[rule]) > 0.15, rule


def test_nothing_is_suggested_from_the_non_finite_region():
    lrs, losses = sweep_curve(nan_after=150)  # NaN from lr ~ 1.6e-2 on, before the blow-up
    r = LRFinderResult.from_sweep(lrs, losses)
    assert r.stop_reason == "non_finite" and r.stop_step == 150
    assert r.suggestions["divergence"] == pytest.approx(lrs[150])
    assert r.smoothed.size == 150 and np.all(np.isfinite(r.smoothed))
    for name in ("valley", "minimum", "steepest"):
        assert r.suggestions[name] < lrs[150]
    assert r.ok


def test_flat_sweep_says_the_range_is_too_low():
    lrs = sweep_lrs(1e-9, 1e-7, 100)
    losses = 2.3 + np.random.default_rng(0).normal(0, 0.05, 100)
    r = LRFinderResult.from_sweep(lrs, losses)
    assert not r.ok and r.recommended_lr is None and r.recommended_peak_lr is None
    assert "never fell" in r.error and "too low" in r.error and "max_lr=1e-04" in r.error
    with pytest.raises(LRFinderError, match="too low"):
        r.raise_for_status()
    with pytest.raises(LRFinderError, match="never fell"):
        r.lr_for_schedule("constant")


def test_early_divergence_says_the_range_is_too_high():
    lrs = sweep_lrs(1e-2, 1e3, 200)
    x = np.log10(lrs)
    losses = 2.3 + np.where(x > -1.7, 20 * (x + 1.7) ** 2, 0) + np.random.default_rng(0).normal(0, 0.03, 200)
    r = LRFinderResult.from_sweep(lrs, losses)
    assert not r.ok and r.stop_reason == "diverged" and r.stop_step < 20
    assert "too high" in r.error and "min_lr=" in r.error and "max_lr=" in r.error


def test_too_few_finite_points_is_reported():
    lrs, losses = sweep_curve(nan_after=5)
    r = LRFinderResult.from_sweep(lrs, losses)
    assert not r.ok and r.stop_reason == "non_finite" and "only 5 finite steps" in r.error


def test_a_floor_reaching_max_lr_warns():
    lrs, losses = sweep_curve(max_lr=1e-2, noise=0.02)  # the loss is still falling at the end
    r = LRFinderResult.from_sweep(lrs, losses)
    assert r.ok and r.stop_reason == "completed"
    assert any("floor reaches max_lr" in w and "max_lr=1e+00" in w for w in r.warnings)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 1.0, 200), "min_lr"),
        ((-1e-3, 1.0, 200), "min_lr"),
        ((1e-3, 1e-3, 200), "below max_lr"),
        ((1e-3, float("inf"), 200), "max_lr"),
        ((1e-7, 1.0, 9), "num_steps"),
        ((1e-7, 1.0, 20.5), "num_steps"),
        ((1e-7, 1.0, 200, 0), "smoothing"),
        ((1e-7, 1.0, 200, 200), "smoothing"),
    ],
)
def test_invalid_arguments_raise_a_user_error_naming_them(args, message):
    with pytest.raises(LRFinderError, match=message) as info:
        check_sweep_args(*args)
    assert isinstance(info.value, UserError) and "try" in str(info.value)


def test_shifting_the_loss_changes_no_suggestion():
    lrs, losses = sweep_curve()
    a = LRFinderResult.from_sweep(lrs, losses)
    b = LRFinderResult.from_sweep(lrs, losses - 10.0)
    for name in SUGGESTION_RULES:
        assert a.suggestions[name] == pytest.approx(b.suggestions[name], rel=1e-9)


def test_probe_lrs_stay_below_half_the_divergence_point_and_max_lr():
    good = LRFinderResult.from_sweep(*sweep_curve())  # diverges near 10**-0.8
    valley, top = good.suggestions["valley"], good.suggestions["divergence"] / 2
    assert good.probe_lrs()[0] == valley and all(lr <= top for lr in good.probe_lrs())
    assert [round(lr / valley) for lr in good.probe_lrs()] == [1, 2, 4, 8][: len(good.probe_lrs())]
    late = LRFinderResult.from_sweep(*sweep_curve(centre=-1.5, blowup=5.0))  # reaches max_lr=1 undiverged
    assert late.ok and max(late.probe_lrs()) <= 1.0
    bad = LRFinderResult.from_sweep(*sweep_curve(centre=3.0))
    assert not bad.ok and bad.probe_lrs() == []


def flat_runs(scores, steps=50):
    return [np.full(steps, float(v)) for v in scores]


def test_probes_pick_the_minimum_of_their_loss_curve():
    result = LRFinderResult.from_sweep(*sweep_curve())
    lrs = np.array([1e-3, 2e-3, 4e-3, 8e-3])
    bowl = (np.log10(lrs) - np.log10(3.3e-3)) ** 2 + 0.4  # a parabola in log LR with its minimum at 3.3e-3
    probed = result.with_probes(lrs, flat_runs(bowl))
    assert probed.recommended_lr == pytest.approx(3.3e-3) == probed.probes["picked"]
    assert probed.recommended_peak_lr == result.recommended_peak_lr and probed.suggestions == result.suggestions
    assert result.with_probes(lrs, flat_runs(bowl - 5.0)).recommended_lr == pytest.approx(3.3e-3)  # below zero too
    falling = result.with_probes(lrs, flat_runs([0.9, 0.8, 0.7, 0.6]))
    assert falling.recommended_lr == 8e-3  # the lowest probe is the last: no extrapolation
    diverged_neighbour = result.with_probes(lrs, flat_runs([0.9, 0.5, float("nan"), 0.7]))
    assert diverged_neighbour.recommended_lr == 2e-3
    saved = json.loads(json.dumps(diverged_neighbour.to_dict(), allow_nan=False))  # standard JSON: no NaN
    assert saved["probes"]["losses"][2] is None and saved["probes"]["runs"][2][0] is None
    assert "4.00e-03: diverged" in diverged_neighbour.summary()
    none = result.with_probes(lrs, flat_runs([float("inf")] * 4))
    assert none.recommended_lr == result.recommended_lr and "every constant-LR probe diverged" in none.warnings[-1]
    with pytest.raises(ValueError, match="as many runs"):
        result.with_probes(lrs, flat_runs([0.5]))


def test_probe_scores_use_the_last_half_and_flag_a_diverged_run():
    rng = np.random.default_rng(0)
    falling = np.linspace(2.0, 1.0, 400) + rng.normal(0, 0.2, 400)
    late_nan = np.r_[np.ones(300), np.nan, np.ones(99)]
    scores, stderr = probe_scores([falling, late_nan])
    assert scores[0] == pytest.approx(falling[200:].mean()) and scores[1] == np.inf
    assert stderr[0] == pytest.approx(0.2 / np.sqrt(200), rel=0.15) and stderr[1] == np.inf
    with pytest.raises(ValueError, match="at least 2 steps"):
        probe_scores([[1.0]])


def test_schedule_lrs_and_unknown_schedule():
    r = LRFinderResult.from_sweep(*sweep_curve())
    assert r.lr_for_schedule("constant") == r.recommended_lr
    assert r.lr_for_schedule("cosine") == r.lr_for_schedule("onecycle") == r.recommended_peak_lr
    with pytest.raises(LRFinderError, match="constant, cosine, onecycle"):
        r.lr_for_schedule("step")


def test_save_writes_csv_json_and_png(tmp_path):
    lrs, losses = sweep_curve(nan_after=190)
    r = LRFinderResult.from_sweep(lrs, losses, metadata={"seed": 3, "batch_size": 32})
    paths = r.save(tmp_path / "out")
    assert set(paths) == {"csv", "json", "png"}
    rows = list(csv.DictReader(paths["csv"].open()))
    assert list(rows[0]) == ["step", "lr", "loss", "smoothed_loss", "smoothed_lr"]
    assert len(rows) == 200 and rows[-1]["loss"] == "nan" and rows[-1]["smoothed_loss"] == ""
    assert float(rows[10]["lr"]) == pytest.approx(lrs[10], rel=1e-7)
    info = json.loads(paths["json"].read_text())
    assert info["ok"] is True and info["seed"] == 3 and info["batch_size"] == 32
    assert set(info["suggestions"]) == set(SUGGESTION_RULES)
    assert info["recommended_lr"] == pytest.approx(r.recommended_lr)
    assert info["stop_reason"] == r.stop_reason and info["num_steps"] == 200
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temporaries


def test_bad_sweep_still_saves_a_plot_and_summary_says_why(tmp_path):
    lrs = sweep_lrs(1e-9, 1e-7, 100)
    r = LRFinderResult.from_sweep(lrs, np.full(100, 2.3))
    r.save(tmp_path)
    assert (tmp_path / "lr_finder.png").stat().st_size > 1000
    text = r.summary()
    assert "BAD SWEEP" in text and "never fell" in text


def test_summary_lists_every_rule_and_both_recommendations():
    r = LRFinderResult.from_sweep(*sweep_curve())
    text = r.summary()
    for name in SUGGESTION_RULES:
        assert name in text
    assert f"{r.recommended_lr:.2e}" in text and f"{r.recommended_peak_lr:.2e}" in text


def test_unequal_arrays_are_rejected():
    with pytest.raises(ValueError, match="equal length"):
        LRFinderResult.from_sweep([1e-3, 1e-2], [1.0])
