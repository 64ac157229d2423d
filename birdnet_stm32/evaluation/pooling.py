"""Pool chunk scores into one score per recording: mean, max or log-mean-exp.

A recording is cut into fixed-length chunks and the model scores each chunk. File-level evaluation needs
one score vector per recording; the pooling method decides how a species heard in a few chunks shows up:

* ``"mean"`` — average over chunks. Robust to a single spurious chunk, but a call heard in 1 of 20 chunks
  is diluted 20-fold.
* ``"max"`` — the highest chunk score. One confident chunk is enough, and one false alarm is too.
* ``"lme"`` — log-mean-exp, a smooth maximum between the two:
  ``lme(s) = log(mean(exp(beta * s))) / beta`` with sharpness ``beta`` (:data:`LME_SHARPNESS` by default).
  As ``beta -> 0`` it tends to the mean and as ``beta -> inf`` to the max; it always lies between them. For
  scores in ``[0, 1]``, ``beta = 10`` lets one chunk at 0.9 among chunks at 0 pool to 0.74 over 5 chunks
  and 0.60 over 20, where the mean gives 0.18 and 0.045.

Every function pools each class column independently and works on any float scores (probabilities,
logits); only :func:`pool_by_group` does the work, :func:`pool` is its one-group case.
"""

from __future__ import annotations

import numpy as np

#: Pooling methods understood by :func:`pool` and :func:`pool_by_group`.
METHODS = ("mean", "max", "lme")

#: Default sharpness ``beta`` of log-mean-exp pooling, for scores on a ``[0, 1]`` scale.
LME_SHARPNESS = 10.0


def pool(scores: np.ndarray, method: str, *, sharpness: float = LME_SHARPNESS) -> np.ndarray:
    """Pool the chunk scores of one recording into one score per class.

    Args:
        scores: Chunk scores, shape ``(n_chunks, C)`` with ``n_chunks >= 1``.
        method: ``"mean"``, ``"max"`` or ``"lme"`` (log-mean-exp).
        sharpness: ``beta`` of log-mean-exp (ignored by the other methods); must be > 0.

    Returns:
        Pooled scores, shape ``(C,)``, float64.

    Raises:
        ValueError: Unknown method, non-positive sharpness, or ``scores`` is not a non-empty 2-D array.

    Examples:
        >>> s = np.array([[0.9, 0.1], [0.0, 0.1], [0.0, 0.1], [0.0, 0.1], [0.0, 0.1]])
        >>> pool(s, "mean").round(2).tolist(), pool(s, "max").tolist()
        ([0.18, 0.1], [0.9, 0.1])
        >>> pool(s, "lme").round(2).tolist()
        [0.74, 0.1]
    """
    scores = np.asarray(scores)
    pooled, _ = pool_by_group(scores, np.zeros(len(scores), dtype=np.int64), method, sharpness=sharpness)
    return pooled[0]


def pool_by_group(
    scores: np.ndarray, groups: np.ndarray, method: str, *, sharpness: float = LME_SHARPNESS
) -> tuple[np.ndarray, np.ndarray]:
    """Pool chunk scores per recording.

    Args:
        scores: Chunk scores, shape ``(n_chunks, C)``.
        groups: Recording id of every chunk, shape ``(n_chunks,)``, integers; chunks of one recording need
            not be adjacent.
        method: ``"mean"``, ``"max"`` or ``"lme"`` (log-mean-exp).
        sharpness: ``beta`` of log-mean-exp (ignored by the other methods); must be > 0.

    Returns:
        ``(pooled, group_ids)``: pooled scores of shape ``(n_files, C)`` (float64) and the recording id of
        each row, shape ``(n_files,)``, in ascending order.

    Raises:
        ValueError: Unknown method, non-positive sharpness, ``scores`` not a non-empty 2-D array, or
            ``groups`` not one integer per chunk.

    Examples:
        >>> s = np.array([[1.0, 0.0], [0.2, 0.0], [0.0, 0.5], [0.6, 1.0]])
        >>> pooled, ids = pool_by_group(s, np.array([7, 3, 7, 3]), "max")
        >>> ids.tolist(), pooled.tolist()
        ([3, 7], [[0.6, 1.0], [1.0, 0.5]])
    """
    if method not in METHODS:
        raise ValueError(f"pooling method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if not sharpness > 0:
        raise ValueError(f"sharpness={sharpness}: must be > 0")
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    if scores.ndim != 2 or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty (n_chunks, C) array, got shape {scores.shape}")
    if groups.shape != (len(scores),) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must hold one integer per chunk ({len(scores)}), got {groups.dtype} {groups.shape}")

    order = np.argsort(groups, kind="stable")
    sorted_scores, sorted_groups = scores[order], groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    counts = np.diff(np.r_[starts, len(sorted_groups)])[:, None]
    group_ids = sorted_groups[starts]

    if method == "mean":
        return np.add.reduceat(sorted_scores, starts, axis=0) / counts, group_ids
    peak = np.maximum.reduceat(sorted_scores, starts, axis=0)
    if method == "max":
        return peak, group_ids
    # lme: subtract each group's max before exponentiating so large beta * s cannot overflow.
    shifted = np.exp(sharpness * (sorted_scores - np.repeat(peak, counts[:, 0], axis=0)))
    return peak + np.log(np.add.reduceat(shifted, starts, axis=0) / counts) / sharpness, group_ids
