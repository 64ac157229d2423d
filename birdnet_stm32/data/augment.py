"""Training-time augmentation of feature batches, inside the ``tf.data`` pipeline.

Three augmentations, applied to whole batches in this order, each switched off by a
zero in :class:`~birdnet_stm32.config.DataConfig`:

* **random gain** (``gain_db``): every example is scaled as if its audio had been
  amplified by ``u ~ U(-gain_db, +gain_db)`` dB, through the host's fixed input scaling
  (``S ** 0.5`` -> factor ``10 ** (u * 0.5 / 20)``; dB scaling -> shift by ``u / 80``);
* **mixup** (``mixup_alpha``): ``x = l * x_i + (1 - l) * x_j`` and the same for the
  targets, with ``l ~ Beta(alpha, alpha)`` and ``j`` a random partner in the batch;
* **SpecAugment masks** (``time_masks``, ``freq_masks``, ``max_mask_fraction``): bands of
  up to ``max_mask_fraction`` of the frames (or frequency bins) are set to 0 (silence).

All randomness is stateless, seeded by ``(seed, batch number)``, so a pipeline gives
the same batches for the same seed. This module imports TensorFlow; it is imported only
when a training pipeline is built.
"""

from __future__ import annotations

import tensorflow as tf

from birdnet_stm32.audio.features import DB_FLOOR, INPUT_POWER
from birdnet_stm32.config import AudioConfig, DataConfig


def random_gain(x: tf.Tensor, seed: tf.Tensor, max_db: float, mag_scale: str) -> tf.Tensor:
    """Scale each example as if its audio had been amplified by a random gain.

    Args:
        x: Feature batch ``(B, H, W, 1)`` computed with the host's input scaling.
        seed: Stateless seed, shape ``(2,)``, int.
        max_db: Gains are uniform in ``[-max_db, +max_db]`` dB.
        mag_scale: The features' ``audio.mag_scale`` (``"db"`` features shift, others scale).

    Returns:
        The batch, same shape.

    Examples:
        >>> x = tf.ones((2, 4, 8, 1))
        >>> y = random_gain(x, tf.constant([1, 2]), 6.0, "pwl")
        >>> bool(tf.reduce_all((y >= 10 ** (-6 * 0.5 / 20) - 1e-6) & (y <= 10 ** (6 * 0.5 / 20) + 1e-6)))
        True
    """
    gain = tf.random.stateless_uniform([tf.shape(x)[0], 1, 1, 1], seed, -max_db, max_db)
    if mag_scale == "db":
        return tf.where(x > 0, tf.clip_by_value(x + gain / -DB_FLOOR, 0.0, 1.0), x)
    return x * tf.pow(10.0, gain * (INPUT_POWER / 20.0))


def _band_mask(seed: tf.Tensor, batch: tf.Tensor, length: int, count: int, max_width: int) -> tf.Tensor:
    """``(B, length)`` float mask: 0 inside ``count`` random bands of width ``0..max_width``, else 1."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    width = tf.random.stateless_uniform([batch, count, 1], seeds[0], 0, max_width + 1, dtype=tf.int32)
    start = tf.cast(
        tf.random.stateless_uniform([batch, count, 1], seeds[1]) * tf.cast(length - width + 1, tf.float32), tf.int32
    )
    pos = tf.range(length)[None, None, :]
    inside = tf.reduce_any((pos >= start) & (pos < start + width), axis=1)
    return 1.0 - tf.cast(inside, tf.float32)


def spec_augment(x: tf.Tensor, seed: tf.Tensor, time_masks: int, freq_masks: int, max_fraction: float) -> tf.Tensor:
    """Zero random time and frequency bands of every example (SpecAugment without time warping).

    Args:
        x: Feature batch ``(B, H, W, 1)``.
        seed: Stateless seed, shape ``(2,)``, int.
        time_masks: Number of time bands per example.
        freq_masks: Number of frequency bands per example.
        max_fraction: Largest band width as a fraction of the axis length (widths are uniform
            from 0 to ``int(max_fraction * length)``).

    Returns:
        The masked batch, same shape.

    Examples:
        >>> y = spec_augment(tf.ones((4, 16, 32, 1)), tf.constant([0, 1]), 2, 2, 0.25)
        >>> float(tf.reduce_min(tf.reduce_mean(y, axis=[1, 2, 3]))) >= (1 - 0.25) ** 2 - 0.25
        True
    """
    height, width = x.shape[1], x.shape[2]
    batch = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    max_t, max_f = int(max_fraction * width), int(max_fraction * height)
    if time_masks > 0 and max_t > 0:
        x = x * _band_mask(seeds[0], batch, width, time_masks, max_t)[:, None, :, None]
    if freq_masks > 0 and max_f > 0:
        x = x * _band_mask(seeds[1], batch, height, freq_masks, max_f)[:, :, None, None]
    return x


def mixup(x: tf.Tensor, y: tf.Tensor, seed: tf.Tensor, alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Blend every example (inputs and targets) with a random partner from the same batch.

    Args:
        x: Feature batch ``(B, H, W, 1)``.
        y: Target batch ``(B, C)``.
        seed: Stateless seed, shape ``(2,)``, int.
        alpha: Parameter of the ``Beta(alpha, alpha)`` mixing weight (small = mostly one example).

    Returns:
        ``(x, y)`` blended; target rows stay convex combinations of the originals.

    Examples:
        >>> x, y = mixup(tf.zeros((4, 2, 2, 1)), tf.eye(4), tf.constant([3, 4]), 0.4)
        >>> [round(float(v), 5) for v in tf.reduce_sum(y, axis=1)]
        [1.0, 1.0, 1.0, 1.0]
    """
    batch = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    g1 = tf.random.stateless_gamma([batch], seeds[0], alpha=alpha)
    g2 = tf.random.stateless_gamma([batch], seeds[1], alpha=alpha)
    total = g1 + g2
    lam = tf.where(total > 0, g1 / tf.maximum(total, 1e-30), tf.ones_like(total))
    partner = tf.argsort(tf.random.stateless_uniform([batch], seeds[2]))
    lam_x = lam[:, None, None, None]
    lam_y = lam[:, None]
    return lam_x * x + (1.0 - lam_x) * tf.gather(x, partner), lam_y * y + (1.0 - lam_y) * tf.gather(y, partner)


def augment_batch(
    x: tf.Tensor, y: tf.Tensor, step: tf.Tensor, seed: int, cfg: DataConfig, audio: AudioConfig | None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Apply the configured augmentations (gain, mixup, masks) to one batch.

    Args:
        x: Feature batch ``(B, H, W, 1)`` float32.
        y: Target batch ``(B, C)`` float32.
        step: Batch number (makes every batch's randomness different and reproducible).
        seed: The pipeline's seed.
        cfg: Augmentation settings.
        audio: Settings the features were computed with; without them random gain is skipped
            (its mapping depends on ``audio.mag_scale``).

    Returns:
        The augmented ``(x, y)``.

    Examples:
        >>> x, y = augment_batch(tf.ones((2, 8, 16, 1)), tf.eye(2), tf.constant(0, tf.int64), 1, DataConfig(),
        ...                      AudioConfig())
        >>> tuple(x.shape), tuple(y.shape)
        ((2, 8, 16, 1), (2, 2))
    """
    base = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
    seeds = tf.random.experimental.stateless_split(base, 3)
    if cfg.gain_db > 0 and audio is not None:
        x = random_gain(x, seeds[0], cfg.gain_db, audio.mag_scale)
    if cfg.mixup_alpha > 0:
        x, y = mixup(x, y, seeds[1], cfg.mixup_alpha)
    if cfg.time_masks > 0 or cfg.freq_masks > 0:
        x = spec_augment(x, seeds[2], cfg.time_masks, cfg.freq_masks, cfg.max_mask_fraction)
    return x, y
