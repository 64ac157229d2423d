"""The DS-CNN classifier: in-graph frontend, depthwise-separable stages and a dense head.

Layout for a ``(64, 256, 1)`` input (frequency x frames x 1) at ``alpha=1.0``, ``depth=2``:

```text
    frontend   [MelProjection]  ->  [PWLCompression]                       64 x 256 x 1
    stem       Conv 3x3 /2, 16 ch, BN, ReLU6                                32 x 128 x 16
    stage 1    block /2 -> 24 ch, then depth-1 stride-1 blocks              16 x  64 x 24
    stage 2    block /2 -> 32 ch, ...                                        8 x  32 x 32
    stage 3    block /2 -> 48 ch, ...                                        4 x  16 x 48
    stage 4    block /2 -> 96 ch, ...                                        2 x   8 x 96
    head       global average pool, dropout, dense, softmax | sigmoid
```

That is about 125k parameters and 12 M multiply-accumulates per example (``alpha=0.5``: 37k and
4.6 M). Once an axis is shorter than 4 the remaining stages keep the resolution, so small inputs work too.

A block is either depthwise-separable (``residual=False``: depthwise 3x3, BN, ReLU6, pointwise 1x1,
BN, ReLU6) or an inverted residual (``residual=True``: pointwise expansion x2, BN, ReLU6, depthwise
3x3, BN, ReLU6, linear pointwise projection, BN, with a skip connection when stride is 1 and the
channel count is unchanged). Squeeze-and-excitation, when on, sits after the depthwise convolution
and is built from 1x1 convolutions (global average pool, 1x1 conv + ReLU, 1x1 conv + sigmoid,
multiply), never ``Dense`` on a 4-D tensor. Every convolution is bias-free and followed by
BatchNormalization, so the converter folds BN into the convolution and fuses ReLU6; every channel
count is a multiple of 8. The model has a static batch when built with ``batch_size=1`` (the export
model), which is what makes every TFLite shape static.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from birdnet_stm32.config import AudioConfig, ModelConfig
from birdnet_stm32.errors import UserError
from birdnet_stm32.models.frontend import MelProjection, PWLCompression

#: Stem channels at ``alpha=1``.
STEM_CHANNELS = 16
#: Output channels of the stages at ``alpha=1``; each stage starts with a stride-2 block.
STAGE_CHANNELS = (24, 32, 48, 96)
#: Channel expansion of inverted-residual blocks.
EXPANSION = 2
#: Squeeze-and-excitation bottleneck as a fraction of the block's channels.
SE_RATIO = 0.25


def round_channels(channels: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, never below ``divisor`` or 90 % of the value.

    Args:
        channels: Unrounded channel count (e.g. base channels times ``alpha``).
        divisor: The multiple (8: the STM32N6 NPU processes channels in groups of 8).

    Returns:
        The rounded count.

    Examples:
        >>> [round_channels(c) for c in (3, 12, 24, 30, 100)]
        [8, 16, 24, 32, 104]
    """
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def build_model(
    audio_cfg: AudioConfig, model_cfg: ModelConfig, num_classes: int, batch_size: int | None = None
) -> keras.Model:
    """Build the configured DS-CNN for the configured frontend.

    The input shape comes from ``birdnet_stm32.audio.features.input_shape(audio_cfg)``; the
    ``hybrid`` mel projection starts from ``birdnet_stm32.audio.features.mel_filterbank(audio_cfg)``.

    Args:
        audio_cfg: Audio and frontend settings (``frontend``, ``mag_scale``, spectrogram size).
        model_cfg: Architecture knobs.
        num_classes: Number of output classes (>= 2 for single-label, >= 1 for multi-label).
        batch_size: Fixed batch size of the input, or ``None`` for a dynamic batch. The export
            model is built with ``batch_size=1``.

    Returns:
        The uncompiled Keras model; outputs are probabilities (softmax or sigmoid).

    Raises:
        UserError: A setting is out of range.

    Examples:
        >>> from birdnet_stm32.config import Config
        >>> cfg = Config()
        >>> model = build_model(cfg.audio, cfg.model, num_classes=6)  # doctest: +SKIP
        >>> model.output_shape  # doctest: +SKIP
        (None, 6)
    """
    from birdnet_stm32.audio.features import input_shape, mel_filterbank

    audio_cfg.validate()
    model_cfg.validate()
    filterbank = mel_filterbank(audio_cfg) if audio_cfg.frontend == "hybrid" else None
    return build_dscnn(
        input_shape(audio_cfg),
        num_classes,
        filterbank=filterbank,
        mag_scale=audio_cfg.mag_scale,
        pwl_max_input=model_cfg.pwl_max_input,
        frontend_trainable=model_cfg.frontend_trainable,
        alpha=model_cfg.alpha,
        depth=model_cfg.depth,
        se=model_cfg.se,
        residual=model_cfg.residual,
        dropout=model_cfg.dropout,
        multi_label=model_cfg.multi_label,
        bn_momentum=model_cfg.bn_momentum,
        batch_size=batch_size,
    )


def build_dscnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    filterbank: np.ndarray | None = None,
    mag_scale: str = "pwl",
    pwl_max_input: float = 1.0,
    frontend_trainable: bool = True,
    alpha: float = 1.0,
    depth: int = 2,
    se: bool = True,
    residual: bool = True,
    dropout: float = 0.3,
    multi_label: bool = False,
    bn_momentum: float = 0.99,
    stem_channels: int = STEM_CHANNELS,
    stage_channels: Sequence[int] = STAGE_CHANNELS,
    batch_size: int | None = None,
    name: str = "dscnn",
) -> keras.Model:
    """Build a DS-CNN with explicit knobs (see the module docstring for the layout).

    Args:
        input_shape: ``(frequency, frames, 1)`` of one host spectrogram.
        num_classes: Number of outputs.
        filterbank: Mel filterbank ``(n_mels, frequency)`` for the ``hybrid`` frontend: the model
            starts with a :class:`~birdnet_stm32.models.frontend.MelProjection` initialized from
            it. ``None`` means the input already is a mel spectrogram (``mel`` frontend).
        mag_scale: ``"pwl"`` adds :class:`~birdnet_stm32.models.frontend.PWLCompression`;
            ``"db"`` (host-side) and ``"none"`` add nothing.
        pwl_max_input: Mel magnitude at which the PWL curve saturates.
        frontend_trainable: Train the mel projection.
        alpha: Width multiplier for every layer (channels rounded to multiples of 8).
        depth: Blocks per stage (the first strided, the others stride 1 with skip connections
            when ``residual``).
        se: Add squeeze-and-excitation to each block.
        residual: Inverted-residual blocks instead of plain depthwise-separable ones.
        dropout: Dropout rate before the dense head.
        multi_label: Sigmoid outputs instead of softmax.
        bn_momentum: BatchNormalization momentum.
        stem_channels: Stem channels at ``alpha=1``.
        stage_channels: Output channels of each stage at ``alpha=1``; each stage halves both
            spatial axes (while both are still >= 4).
        batch_size: Fixed batch size (``1`` for export) or ``None``.
        name: Model name.

    Returns:
        The uncompiled Keras model.

    Raises:
        UserError: The input does not have one channel, or a knob is out of range.

    Examples:
        >>> model = build_dscnn((16, 32, 1), 3, alpha=0.5, stage_channels=(16, 32))
        >>> model.output_shape
        (None, 3)
    """
    height, width, channels = (int(v) for v in input_shape)
    if channels != 1:
        raise UserError(f"model input must have 1 channel, got input shape {tuple(input_shape)}")
    if num_classes < 1:
        raise UserError(f"num_classes={num_classes}: must be >= 1")
    if mag_scale not in ("pwl", "db", "none"):
        raise UserError(f"audio.mag_scale={mag_scale!r}: choose pwl, db or none")
    if alpha <= 0 or depth < 1:
        raise UserError(f"model.alpha={alpha}, model.depth={depth}: need alpha > 0 and depth >= 1")
    inputs = keras.Input((height, width, 1), batch_size=batch_size, name="spectrogram")
    x = inputs
    if filterbank is not None:
        x = MelProjection(filterbank, trainable=frontend_trainable, name="mel_projection")(x)
    if mag_scale == "pwl":
        x = PWLCompression(max_input=pwl_max_input, name="pwl")(x)

    bn = {"momentum": bn_momentum}
    x = keras.layers.Conv2D(round_channels(stem_channels * alpha), 3, strides=_strides(x), padding="same",
                            use_bias=False, name="stem_conv")(x)  # fmt: skip
    x = keras.layers.BatchNormalization(**bn, name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    for s, base in enumerate(stage_channels, start=1):
        out_channels = round_channels(base * alpha)
        for b in range(1, depth + 1):
            prefix = f"stage{s}_block{b}"
            block = _inverted_residual if residual else _separable
            x = block(x, out_channels, stride=_strides(x) if b == 1 else (1, 1), se=se, bn=bn, prefix=prefix)

    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Activation("sigmoid" if multi_label else "softmax", name="scores", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def _strides(x: Any) -> tuple[int, int]:
    """Stride 2 while both spatial axes still have >= 4 positions, else 1 (tiny inputs stay valid).

    Both axes get the same stride: TensorFlow's depthwise convolution supports no other.
    """
    return (2, 2) if min(int(size) for size in x.shape[1:3]) >= 4 else (1, 1)


def _conv_bn(x: Any, channels: int, bn: dict[str, float], name: str, relu: bool = True) -> Any:
    x = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(**bn, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x


def _depthwise_bn(x: Any, stride: tuple[int, int], bn: dict[str, float], name: str) -> Any:
    x = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(**bn, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu")(x)


def _squeeze_excite(x: Any, prefix: str) -> Any:
    channels = int(x.shape[-1])
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}_se_pool")(x)
    s = keras.layers.Conv2D(round_channels(channels * SE_RATIO), 1, activation="relu", name=f"{prefix}_se_reduce")(s)
    s = keras.layers.Conv2D(channels, 1, activation="sigmoid", name=f"{prefix}_se_expand")(s)
    return keras.layers.Multiply(name=f"{prefix}_se_scale")([x, s])


def _separable(x: Any, channels: int, *, stride: tuple[int, int], se: bool, bn: dict[str, float], prefix: str) -> Any:
    x = _depthwise_bn(x, stride, bn, f"{prefix}_dw")
    if se:
        x = _squeeze_excite(x, prefix)
    return _conv_bn(x, channels, bn, f"{prefix}_pw")


def _inverted_residual(
    x: Any, channels: int, *, stride: tuple[int, int], se: bool, bn: dict[str, float], prefix: str
) -> Any:
    shortcut = x
    in_channels = int(x.shape[-1])
    h = _conv_bn(x, round_channels(in_channels * EXPANSION), bn, f"{prefix}_expand")
    h = _depthwise_bn(h, stride, bn, f"{prefix}_dw")
    if se:
        h = _squeeze_excite(h, prefix)
    h = _conv_bn(h, channels, bn, f"{prefix}_project", relu=False)
    if stride == (1, 1) and in_channels == channels:
        h = keras.layers.Add(name=f"{prefix}_add")([shortcut, h])
    return h


def model_summary(model: keras.Model) -> dict[str, Any]:
    """Size and cost figures of a model, for the user and for ``model_config.json``.

    Args:
        model: A model from :func:`build_model` / :func:`build_dscnn` (any functional Keras model
            of Conv2D, DepthwiseConv2D, Dense and element-wise layers works).

    Returns:
        A JSON-ready dict: ``params`` (total), ``trainable_params``, ``macs`` (multiply-accumulates
        per example), ``int8_weight_bytes`` (estimated size of the int8 weights after export: one
        byte per weight of convolution/dense kernels after BatchNorm folding, four per bias and
        per output channel for the per-channel scales), ``peak_activation_bytes`` (estimated
        largest sum of int8 activation tensors alive at once, batch 1, with skip connections held
        alive), ``input_shape`` and ``num_classes``.

    Examples:
        >>> s = model_summary(build_dscnn((16, 32, 1), 3, stage_channels=(16,)))
        >>> sorted(s)[:4]
        ['input_shape', 'int8_weight_bytes', 'macs', 'num_classes']
    """
    macs = 0
    weight_bytes = 0
    for layer in _leaf_layers(model):
        in_shape = _first_input_shape(layer)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw, cin, mult = layer.kernel.shape
            out_h, out_w = layer.output.shape[1:3]
            macs += out_h * out_w * kh * kw * cin * mult
            weight_bytes += kh * kw * cin * mult + 8 * cin * mult
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            out_h, out_w = layer.output.shape[1:3]
            macs += out_h * out_w * kh * kw * cin * cout
            weight_bytes += kh * kw * cin * cout + 8 * cout
        elif isinstance(layer, keras.layers.Dense):
            cin, cout = layer.kernel.shape
            macs += cin * cout
            weight_bytes += cin * cout + 8 * cout
        elif isinstance(layer, MelProjection):
            macs += layer.macs(in_shape)
            weight_bytes += layer.n_bins * layer.n_mels + 4 * layer.n_mels
        elif isinstance(layer, PWLCompression):
            macs += layer.macs(in_shape)
            weight_bytes += 3 * 8 * layer.num_segments
    return {
        "params": int(model.count_params()),
        "trainable_params": int(sum(math.prod(w.shape) for w in model.trainable_weights)),
        "macs": int(macs),
        "int8_weight_bytes": int(weight_bytes),
        "peak_activation_bytes": _peak_activation_bytes(model),
        "input_shape": [int(d) for d in model.input_shape[1:]],
        "num_classes": int(model.output_shape[-1]),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Format :func:`model_summary` as a few human-readable lines.

    Args:
        summary: The dict from :func:`model_summary`.

    Returns:
        A multi-line string.

    Examples:
        >>> print(format_summary({"params": 101234, "trainable_params": 99000, "macs": 23_400_000,
        ...     "int8_weight_bytes": 110_000, "peak_activation_bytes": 262_144, "input_shape": [64, 256, 1],
        ...     "num_classes": 6}))
        model: input 64x256x1 -> 6 classes
          parameters        101,234 (99,000 trainable)
          MACs / example    23.4 M
          int8 weights      107.4 KiB (estimate)
          peak activations  256.0 KiB (estimate, int8, batch 1)
    """
    shape = "x".join(str(d) for d in summary["input_shape"])
    return "\n".join(
        [
            f"model: input {shape} -> {summary['num_classes']} classes",
            f"  parameters        {summary['params']:,} ({summary['trainable_params']:,} trainable)",
            f"  MACs / example    {summary['macs'] / 1e6:.1f} M",
            f"  int8 weights      {summary['int8_weight_bytes'] / 1024:.1f} KiB (estimate)",
            f"  peak activations  {summary['peak_activation_bytes'] / 1024:.1f} KiB (estimate, int8, batch 1)",
        ]
    )


def _leaf_layers(model: keras.Model) -> list[Any]:
    return [op for op in model.operations if not isinstance(op, keras.layers.InputLayer)]


def _first_input_shape(layer: Any) -> tuple[int | None, ...]:
    node = layer._inbound_nodes[0]
    return tuple(node.input_tensors[0].shape) if node.input_tensors else ()


def _peak_activation_bytes(model: keras.Model) -> int:
    """Largest total of int8 activation bytes alive at once, walking the layers in graph order.

    BatchNormalization, ReLU, activation and dropout layers are folded into the preceding operator
    by the converter, so their outputs share the input's buffer instead of adding one.
    """
    ops = model.operations
    buffer: dict[int, int] = {}  # tensor id -> buffer id
    size: dict[int, int] = {}  # buffer id -> bytes
    last_use: dict[int, int] = {}  # buffer id -> index of the last op reading it
    created: list[list[int]] = []
    for i, op in enumerate(ops):
        new = []
        for node in op._inbound_nodes:
            ins = [buffer[id(t)] for t in node.input_tensors]
            for b in ins:
                last_use[b] = i
            for t in node.outputs:
                if isinstance(op, _FOLDED_LAYERS) and ins:
                    buffer[id(t)] = ins[0]
                else:
                    buffer[id(t)] = id(t)
                    size[id(t)] = math.prod(d for d in t.shape[1:] if d is not None)
                    new.append(id(t))
        created.append(new)
    for t in model.outputs:
        last_use[buffer[id(t)]] = len(ops)
    peak = 0
    alive: set[int] = set()
    for i, new in enumerate(created):
        alive.update(new)
        peak = max(peak, sum(size[b] for b in alive))
        alive = {b for b in alive if last_use.get(b, -1) > i}
    return int(peak)


_FOLDED_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.Dropout,
)
