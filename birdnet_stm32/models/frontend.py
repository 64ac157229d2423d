"""In-graph audio frontend: the trainable mel projection and piecewise-linear magnitude compression.

The model input is a host-computed spectrogram laid out as ``(frequency, time, 1)``:

* ``mel`` frontend — the host computes the mel spectrogram; the model starts at the magnitude scaling.
* ``hybrid`` frontend — the host computes the linear STFT magnitude ``(n_fft // 2 + 1, frames, 1)``;
  :class:`MelProjection` maps it to ``(n_mels, frames, 1)`` with a matrix initialized from the mel
  filterbank (trainable or frozen).

Both layers lower to int8 TFLite builtins with static shapes: the projection to TRANSPOSE, a 1x1
CONV_2D and TRANSPOSE; the compression to two 1x1 CONV_2D (the first with a fused RELU6).

## Piecewise-linear compression (``pwl``)

A monotone, concave map of the magnitude ``x >= 0`` with ``K`` segments between fixed breakpoints
``0 = t_0 < t_1 < ... < t_K = max_input`` spaced an octave apart (``t_k = max_input * 2**(k - K)``
for ``k >= 1``). Segment ``k`` has width ``w_k = t_{k+1} - t_k`` and slope ``g_k``; the output is the
sum of each segment's rise up to ``x``:

```text
y(x) = sum_k  g_k * clip(x - t_k, 0, w_k)
     = sum_k  (g_k * w_k / 6) * relu6((6 / w_k) * (x - t_k))
```

so ``y`` is continuous, flat above ``max_input`` (saturation) and linear with slope ``g_k`` inside
segment ``k``. The slopes are parameterized so that they always decrease and stay positive,
which makes ``y`` monotone and concave (compressive) whatever the training does:

```text
g_{K-1} = softplus(u_{K-1}),   g_k = g_{k+1} + softplus(u_k)
```

Only ``u`` is trained. Why this form quantizes cleanly: every hinge channel ``relu6(...)`` spans
the same range ``[0, 6]``, so the shared int8 activation scale of the ``K``-channel tensor fits all
of them; the second convolution's weights ``g_k * w_k / 6`` (the segments' rises) are all positive,
so no large terms cancel (a plain sum of ReLU hinges, ``g_0 x - sum_k d_k relu(x - t_k)``, subtracts
big numbers from each other and loses everything to int8 rounding).

The initial curve is ``log(1 + x / (knee * max_input))`` scaled to end at 1, with
:data:`PWL_KNEE` = 1: a mild compression (slope 1.44 at 0, 0.72 at ``max_input``) that training can
steepen. A steep start (a knee an octave above the first breakpoint) compresses more in float but
multiplies the int8 rounding error of its input by its slope near zero (about 18x), which the
exporter's fidelity check measures as a several-point accuracy drop (see
``docs/benchmarks/export.md``); the host's square-root input scaling already compresses by half in
decibels.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

#: Package name under which the custom layers are registered for Keras (de)serialization.
PACKAGE = "birdnet_stm32"

#: Default number of PWL segments (also the channel count of the hinge tensor; a multiple of 8).
PWL_SEGMENTS = 8

#: Knee of the initial PWL curve as a fraction of ``max_input`` (see :func:`pwl_initial_params`).
PWL_KNEE = 1.0


def pwl_breakpoints(max_input: float, num_segments: int = PWL_SEGMENTS) -> np.ndarray:
    """Breakpoints ``t_0 .. t_K`` of the compression: 0, then octaves up to ``max_input``.

    Args:
        max_input: Input magnitude where the curve saturates (its last breakpoint), > 0.
        num_segments: Number of segments ``K`` (>= 2).

    Returns:
        Array of ``K + 1`` increasing breakpoints, float64.

    Raises:
        ValueError: ``max_input <= 0`` or fewer than 2 segments.

    Examples:
        >>> pwl_breakpoints(1.0, 4).tolist()
        [0.0, 0.125, 0.25, 0.5, 1.0]
    """
    if max_input <= 0 or num_segments < 2:
        raise ValueError(f"pwl needs max_input > 0 and >= 2 segments, got {max_input}, {num_segments}")
    k = np.arange(1, num_segments + 1, dtype=np.float64)
    return np.concatenate([[0.0], max_input * 2.0 ** (k - num_segments)])


def pwl_initial_params(breakpoints: np.ndarray, knee: float = PWL_KNEE) -> np.ndarray:
    """Slope parameters ``u`` whose curve is ``log(1 + x / (knee * max_input))``, scaled to end at 1.

    Args:
        breakpoints: The ``K + 1`` breakpoints from :func:`pwl_breakpoints` (the last is ``max_input``).
        knee: Where the curve turns from linear to logarithmic, as a fraction of ``max_input``.

    Returns:
        ``K`` unconstrained parameters (inverse softplus of the slope decrements), float64.

    Examples:
        >>> t = pwl_breakpoints(1.0, 8)
        >>> round(float(pwl_numpy(np.array([1.0]), t, pwl_initial_params(t))[0]), 6)
        1.0
    """
    t = np.asarray(breakpoints, dtype=np.float64)
    target = np.log1p(t / (knee * t[-1]))
    target /= target[-1]
    slopes = np.diff(target) / np.diff(t)
    decrements = np.append(slopes[:-1] - slopes[1:], slopes[-1])
    return np.log(np.expm1(np.maximum(decrements, 1e-12)))


def pwl_slopes(params: np.ndarray) -> np.ndarray:
    """Segment slopes ``g`` from the parameters ``u``: positive and non-increasing by construction.

    Args:
        params: The ``K`` slope parameters ``u``.

    Returns:
        The ``K`` slopes, float64, with ``g_0 >= g_1 >= ... >= g_{K-1} > 0``.

    Examples:
        >>> g = pwl_slopes(np.array([0.0, -1.0, 2.0]))
        >>> bool(np.all(np.diff(g) <= 0) and np.all(g > 0))
        True
    """
    decrements = np.logaddexp(0.0, np.asarray(params, dtype=np.float64))
    return np.cumsum(decrements[::-1])[::-1]


def pwl_numpy(x: np.ndarray, breakpoints: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Evaluate the compression in NumPy: ``y = sum_k g_k * clip(x - t_k, 0, w_k)``.

    The reference for :class:`PWLCompression` (same math, float64).

    Args:
        x: Magnitudes (any shape).
        breakpoints: The ``K + 1`` breakpoints.
        params: The ``K`` slope parameters.

    Returns:
        The compressed values, same shape as ``x``.

    Examples:
        >>> t = pwl_breakpoints(1.0, 2)
        >>> y = pwl_numpy(np.array([0.0, 0.5, 2.0]), t, np.log(np.expm1([1.0, 1.0])))
        >>> np.round(y, 6).tolist()  # slopes 2 then 1; flat above max_input
        [0.0, 1.0, 1.5]
    """
    t = np.asarray(breakpoints, dtype=np.float64)
    g = pwl_slopes(params)
    x = np.asarray(x, dtype=np.float64)[..., None]
    return np.sum(g * np.clip(x - t[:-1], 0.0, np.diff(t)), axis=-1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MelProjection(keras.layers.Layer):
    """Project a linear STFT magnitude ``(F, T, 1)`` onto mel bands ``(n_mels, T, 1)``.

    A learnable non-negative matrix ``(F, n_mels)``, initialized from the mel filterbank, applied as
    a 1x1 convolution over the frequency axis (moved to channels by a transpose and back), so the
    int8 export is TRANSPOSE -> CONV_2D (1x1, no bias) -> TRANSPOSE with static shapes.

    Args:
        filterbank: Initial mel filterbank, shape ``(n_mels, F)`` (as from
            ``birdnet_stm32.audio.features.mel_filterbank``).
        trainable: Train the projection (``False`` freezes it at the filterbank).
        **kwargs: Standard ``keras.layers.Layer`` arguments (``name``, ``dtype``).

    Examples:
        >>> fb = np.eye(4, 6, dtype="float32")
        >>> layer = MelProjection(fb)
        >>> tuple(layer(np.ones((2, 6, 5, 1), "float32")).shape)
        (2, 4, 5, 1)
    """

    def __init__(self, filterbank: Any, trainable: bool = True, **kwargs: Any) -> None:
        super().__init__(trainable=trainable, **kwargs)
        self.filterbank = np.asarray(filterbank, dtype=np.float32)
        if self.filterbank.ndim != 2:
            raise ValueError(f"filterbank must be 2-D (n_mels, n_bins), got shape {self.filterbank.shape}")
        self.n_mels, self.n_bins = self.filterbank.shape

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """Create the projection matrix.

        Args:
            input_shape: ``(batch, n_bins, frames, 1)``.

        Raises:
            ValueError: The input is not ``(batch, n_bins, frames, 1)`` for this filterbank.
        """
        if len(input_shape) != 4 or input_shape[1] != self.n_bins or input_shape[3] != 1:
            raise ValueError(f"MelProjection expects (batch, {self.n_bins}, frames, 1), got {tuple(input_shape)}")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.n_bins, self.n_mels),
            initializer=keras.initializers.Constant(self.filterbank.T),
            constraint=keras.constraints.NonNeg(),
            trainable=self.trainable,
        )

    def call(self, inputs: Any) -> Any:
        """Apply the projection.

        Args:
            inputs: STFT magnitudes ``(batch, n_bins, frames, 1)``.

        Returns:
            Mel magnitudes ``(batch, n_mels, frames, 1)``.
        """
        x = ops.transpose(inputs, (0, 3, 2, 1))
        x = ops.conv(x, ops.reshape(self.kernel, (1, 1, self.n_bins, self.n_mels)), padding="valid")
        return ops.transpose(x, (0, 3, 2, 1))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """Shape after projection: ``(batch, n_mels, frames, 1)``."""
        return (input_shape[0], self.n_mels, input_shape[2], 1)

    def macs(self, input_shape: tuple[int | None, ...]) -> int:
        """Multiply-accumulates of one example: ``n_bins * n_mels * frames``.

        Args:
            input_shape: The layer's input shape ``(batch, frequency, frames, 1)``.

        Returns:
            Multiply-accumulates for one example.
        """
        return int(self.n_bins * self.n_mels * input_shape[2])

    def get_config(self) -> dict[str, Any]:
        """Return the layer config (the initial filterbank as nested lists)."""
        return {**super().get_config(), "filterbank": self.filterbank.tolist()}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PWLCompression(keras.layers.Layer):
    """Monotone, concave piecewise-linear magnitude compression (see the module docstring for the math).

    Args:
        max_input: Magnitude at which the curve saturates (the last breakpoint).
        num_segments: Number of linear segments (octaves below ``max_input``).
        **kwargs: Standard ``keras.layers.Layer`` arguments (``name``, ``trainable``, ``dtype``).

    Examples:
        >>> layer = PWLCompression(max_input=1.0)
        >>> y = layer(np.array([0.0, 0.01, 0.1, 1.0, 4.0], "float32").reshape(1, 5, 1, 1))
        >>> [round(float(v), 3) for v in np.ravel(y)]
        [0.0, 0.014, 0.137, 1.0, 1.0]
    """

    def __init__(self, max_input: float = 1.0, num_segments: int = PWL_SEGMENTS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_input = float(max_input)
        self.num_segments = int(num_segments)
        self.breakpoints = pwl_breakpoints(self.max_input, self.num_segments)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """Create the slope parameters.

        Args:
            input_shape: ``(batch, frequency, frames, 1)``.

        Raises:
            ValueError: The input does not have exactly one channel.
        """
        if len(input_shape) != 4 or input_shape[3] != 1:
            raise ValueError(f"PWLCompression expects (batch, frequency, frames, 1), got {tuple(input_shape)}")
        self.params = self.add_weight(
            name="params",
            shape=(self.num_segments,),
            initializer=keras.initializers.Constant(pwl_initial_params(self.breakpoints)),
        )

    def call(self, inputs: Any) -> Any:
        """Compress magnitudes.

        Args:
            inputs: Non-negative magnitudes ``(batch, frequency, frames, 1)``.

        Returns:
            Compressed values, same shape.
        """
        t = self.breakpoints
        widths = np.diff(t)
        k = self.num_segments
        hinge_kernel = ops.convert_to_tensor((6.0 / widths).reshape(1, 1, 1, k), dtype=self.compute_dtype)
        hinge_bias = ops.convert_to_tensor(-6.0 * t[:-1] / widths, dtype=self.compute_dtype)
        hinges = ops.relu6(ops.conv(inputs, hinge_kernel, padding="valid") + hinge_bias)
        decrements = ops.softplus(ops.cast(self.params, self.compute_dtype))
        slopes = ops.flip(ops.cumsum(ops.flip(decrements, 0)), 0)
        rises = slopes * ops.convert_to_tensor(widths / 6.0, dtype=self.compute_dtype)
        return ops.conv(hinges, ops.reshape(rises, (1, 1, k, 1)), padding="valid")

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """Same shape as the input."""
        return tuple(input_shape)

    def macs(self, input_shape: tuple[int | None, ...]) -> int:
        """Multiply-accumulates of one example: two 1x1 convolutions through ``K`` channels.

        Args:
            input_shape: The layer's input shape ``(batch, frequency, frames, 1)``.

        Returns:
            Multiply-accumulates for one example.
        """
        return int(2 * self.num_segments * input_shape[1] * input_shape[2])

    def get_config(self) -> dict[str, Any]:
        """Return the layer config."""
        return {**super().get_config(), "max_input": self.max_input, "num_segments": self.num_segments}
