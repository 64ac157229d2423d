"""Metrics, pooling and the confusion-matrix plot: numpy only, checked against scikit-learn."""

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from birdnet_stm32.evaluation import metrics as M
from birdnet_stm32.evaluation.plots import plot_confusion_matrix
from birdnet_stm32.evaluation.pooling import METHODS, pool, pool_by_group


def _random_problem(seed, n=200, c=6, noise_rows=20, multi_label=False, quantize=False):
    rng = np.random.default_rng(seed)
    if multi_label:
        y = (rng.random((n, c)) < 0.3).astype(np.float32)
    else:
        y = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
    y[:noise_rows] = 0.0
    logits = 1.5 * y + rng.normal(size=(n, c))
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if quantize:  # coarse scores with many ties, as int8 outputs produce
        prob = np.round(prob * 16) / 16
    return y, prob


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("multi_label", [False, True])
def test_ranking_metrics_match_sklearn(seed, quantize, multi_label):
    y, p = _random_problem(seed, quantize=quantize, multi_label=multi_label)
    assert not quantize or len(np.unique(p)) < 20  # the tie-handling path is exercised
    for c in range(y.shape[1]):
        assert M.roc_auc(y[:, c], p[:, c]) == pytest.approx(skm.roc_auc_score(y[:, c], p[:, c]), abs=1e-12)
        assert M.average_precision(y[:, c], p[:, c]) == pytest.approx(
            skm.average_precision_score(y[:, c], p[:, c]), abs=1e-12
        )
    assert M.macro_roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p, average="macro"), abs=1e-12)
    assert M.cmap(y, p) == pytest.approx(skm.average_precision_score(y, p, average="macro"), abs=1e-12)
    np.testing.assert_allclose(
        M.average_precision_per_class(y, p), skm.average_precision_score(y, p, average=None), atol=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_and_confusion_matrix_match_sklearn_on_labeled_rows(seed):
    y, p = _random_problem(seed, noise_rows=25)
    labeled = y.any(axis=1)
    true_idx, pred_idx = y[labeled].argmax(1), p[labeled].argmax(1)
    assert M.accuracy(y, p) == pytest.approx(skm.accuracy_score(true_idx, pred_idx))
    cm = M.confusion_matrix(y, p, y.shape[1])
    np.testing.assert_array_equal(cm, skm.confusion_matrix(true_idx, pred_idx, labels=range(y.shape[1])))
    with_noise = M.confusion_matrix(y, p, y.shape[1], noise_row=True)
    np.testing.assert_array_equal(with_noise[:-1], cm)
    np.testing.assert_array_equal(with_noise[-1], np.bincount(p[~labeled].argmax(1), minlength=y.shape[1]))


def test_multi_label_accuracy_counts_any_positive_and_matches_confusion_trace():
    y = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    p = np.array([[0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.5, 0.2, 0.3], [0.9, 0.0, 0.1]])
    assert M.accuracy(y, p) == pytest.approx(1 / 3)
    cm = M.confusion_matrix(y, p, 3)
    assert cm.sum() == 3 and np.trace(cm) / cm.sum() == pytest.approx(M.accuracy(y, p))
    assert cm[0, 2] == 1 and cm[1, 1] == 1 and cm[2, 0] == 1  # miss counted in the row of the first positive


@pytest.mark.filterwarnings("ignore:No positive class found")
def test_class_without_positives_is_skipped_not_zero():
    y, p = _random_problem(5, c=4)
    y[:, 2] = 0.0  # class 2 absent from the data
    ap = M.average_precision_per_class(y, p)
    auc = M.roc_auc_per_class(y, p)
    assert math.isnan(ap[2]) and math.isnan(auc[2])
    present = [0, 1, 3]
    assert M.cmap(y, p) == pytest.approx(skm.average_precision_score(y[:, present], p[:, present], average="macro"))
    assert M.macro_roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y[:, present], p[:, present], average="macro"))
    # scikit-learn would give AP 0 for the absent class, pulling the mean down
    assert M.cmap(y, p) > np.mean(skm.average_precision_score(y, p, average=None))


def test_undefined_metrics_are_nan_and_none_in_report():
    y = np.zeros((4, 2))
    p = np.full((4, 2), 0.5)
    assert math.isnan(M.accuracy(y, p)) and math.isnan(M.macro_roc_auc(y, p)) and math.isnan(M.cmap(y, p))
    assert math.isnan(M.roc_auc(np.ones(3), np.arange(3.0)))
    report = M.compute_metrics(y, p, ["a", "b"])
    assert report["accuracy"] is None and report["roc_auc"] is None and report["cmap"] is None
    assert report["n_noise"] == 4 and report["per_class"]["a"] == {"ap": None, "roc_auc": None, "n_positive": 0}
    json.dumps(report, allow_nan=False)


def test_all_tied_scores_give_chance_auc_and_prevalence_ap():
    y = np.array([1, 0, 0, 1, 0])
    s = np.full(5, 0.3)
    assert M.roc_auc(y, s) == 0.5
    assert M.average_precision(y, s) == pytest.approx(0.4)


def test_soft_targets_are_binarized_at_half():
    y_hard = np.eye(3)[[0, 1, 2, 1]]
    y_smooth = y_hard * 0.9 + 0.1 / 3  # label smoothing 0.1
    p = np.random.default_rng(0).random((4, 3))
    assert M.compute_metrics(y_smooth, p, "abc") == M.compute_metrics(y_hard, p, "abc")


def test_compute_metrics_is_json_ready_with_accuracy_first():
    y, p = _random_problem(7, c=3)
    report = M.compute_metrics(y, p, ["x", "y", "z"])
    assert next(iter(report)) == "accuracy"
    assert report["n_examples"] == 200 and report["n_noise"] == 20 and report["n_labeled"] == 180
    assert sum(v["n_positive"] for v in report["per_class"].values()) == 180
    assert report["per_class"]["y"]["ap"] == pytest.approx(skm.average_precision_score(y[:, 1], p[:, 1]))
    json.loads(json.dumps(report, allow_nan=False))


def test_bad_shapes_and_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        M.accuracy(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        M.cmap(np.eye(2), np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="labels"):
        M.compute_metrics(np.eye(2), np.eye(2), ["only-one"])


# --- pooling ---------------------------------------------------------------------------------------------


def test_pool_methods_math():
    s = np.array([[0.2, 0.0], [0.8, 0.0], [0.5, 1.0]])
    np.testing.assert_allclose(pool(s, "mean"), [0.5, 1 / 3])
    np.testing.assert_allclose(pool(s, "max"), [0.8, 1.0])
    beta = 4.0
    expected = np.log(np.mean(np.exp(beta * s), axis=0)) / beta
    np.testing.assert_allclose(pool(s, "lme", sharpness=beta), expected)


def test_lme_lies_between_mean_and_max_and_tends_to_both():
    s = np.random.default_rng(3).random((12, 5))
    lme = pool(s, "lme")
    assert np.all(lme >= pool(s, "mean") - 1e-12) and np.all(lme <= pool(s, "max") + 1e-12)
    np.testing.assert_allclose(pool(s, "lme", sharpness=1e-6), pool(s, "mean"), atol=1e-6)
    np.testing.assert_allclose(pool(s, "lme", sharpness=1e4), pool(s, "max"), atol=1e-3)


def test_lme_does_not_overflow_on_large_scores():
    s = np.array([[1000.0], [999.0]])
    assert np.isfinite(pool(s, "lme", sharpness=50.0)).all()


@pytest.mark.parametrize("method", METHODS)
def test_pool_by_group_matches_pooling_each_group(method):
    rng = np.random.default_rng(11)
    scores = rng.random((40, 3))
    groups = rng.choice([4, 9, 2, 17], size=40)  # interleaved, unsorted ids
    pooled, ids = pool_by_group(scores, groups, method)
    assert ids.tolist() == [2, 4, 9, 17]
    for row, gid in zip(pooled, ids, strict=True):
        np.testing.assert_allclose(row, pool(scores[groups == gid], method))


def test_single_chunk_pools_to_itself():
    s = np.array([[0.3, 0.7]])
    for method in METHODS:
        np.testing.assert_allclose(pool(s, method), s[0])


def test_pooling_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown"):
        pool(np.ones((2, 2)), "median")
    with pytest.raises(ValueError, match="non-empty"):
        pool(np.ones((0, 2)), "mean")
    with pytest.raises(ValueError, match="one integer per chunk"):
        pool_by_group(np.ones((3, 2)), np.array([0, 1]), "mean")
    with pytest.raises(ValueError, match="sharpness"):
        pool(np.ones((2, 2)), "lme", sharpness=0.0)


# --- plot ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_row", [False, True])
def test_confusion_matrix_plot_is_written(tmp_path, noise_row):
    y, p = _random_problem(0, c=12)
    counts = M.confusion_matrix(y, p, 12, noise_row=noise_row)
    out = plot_confusion_matrix(counts, [f"species_{i}" for i in range(12)], tmp_path / "sub" / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in (tmp_path / "sub").iterdir()] == ["cm.png"]  # no temporary file left


def test_confusion_matrix_plot_rejects_mismatched_labels(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b"], tmp_path / "cm.png")
