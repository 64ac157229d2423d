"""The model builder: in-graph frontend layers, DS-CNN knobs, summary figures, safe-mode reload, int8 export."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from birdnet_stm32.audio.features import input_shape, mel_filterbank  # noqa: E402
from birdnet_stm32.config import AudioConfig, ExportConfig, ModelConfig  # noqa: E402
from birdnet_stm32.errors import UserError  # noqa: E402
from birdnet_stm32.models import build_dscnn, build_model, format_summary, model_summary  # noqa: E402
from birdnet_stm32.models.dscnn import round_channels  # noqa: E402
from birdnet_stm32.models.frontend import (  # noqa: E402
    MelProjection,
    PWLCompression,
    pwl_breakpoints,
    pwl_initial_params,
    pwl_numpy,
    pwl_slopes,
)

TINY_STAGES = (16, 24)


def tiny_audio(frontend="mel", mag_scale="pwl"):
    return AudioConfig(sample_rate=8000, chunk_duration=0.5, n_fft=64, spec_width=32, n_mels=16, fmin=100.0,
                       fmax=4000.0, frontend=frontend, mag_scale=mag_scale)  # fmt: skip


# --- PWL math (NumPy) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pwl_is_monotone_and_concave_for_any_parameters(seed):
    rng = np.random.default_rng(seed)
    t = pwl_breakpoints(rng.uniform(0.1, 10.0), int(rng.integers(2, 12)))
    params = rng.normal(0.0, 3.0, size=len(t) - 1)
    x = np.linspace(0.0, 1.5 * t[-1], 4001)
    y = pwl_numpy(x, t, params)
    dy = np.diff(y)
    assert np.all(dy >= -1e-12), "not monotone"
    slopes = dy / np.diff(x)
    assert np.all(np.diff(slopes) <= 1e-9 * slopes.max()), "slopes increase somewhere: not concave"
    assert slopes[0] > slopes[len(slopes) // 2] > 0, "not compressive inside the range"
    assert y[0] == 0.0


def test_pwl_slopes_are_positive_and_non_increasing():
    g = pwl_slopes(np.array([-20.0, 0.0, 5.0, -3.0]))
    assert np.all(g > 0) and np.all(np.diff(g) <= 0)


@pytest.mark.parametrize("knee", [1.0 / 128, 1.0 / 16, 1.0])
def test_pwl_initial_curve_is_the_log_curve_through_the_breakpoints(knee):
    t = pwl_breakpoints(2.0, 8)
    y = pwl_numpy(t, t, pwl_initial_params(t, knee))
    np.testing.assert_allclose(y, np.log1p(t / (knee * 2.0)) / np.log1p(1 / knee), atol=1e-6)
    assert y[-1] == pytest.approx(1.0)
    if knee == 1.0 / 128:  # knee at the first breakpoint: every octave rises about equally, like decibels
        assert np.diff(y).max() / np.diff(y).min() < 2.0


def test_default_pwl_starts_mildly_compressive():
    t = pwl_breakpoints(1.0)
    g = pwl_slopes(pwl_initial_params(t))
    assert 1.0 < g[0] < 2.0 and 0.5 < g[-1] < 1.0  # slope 1/ln 2 at zero, 1/(2 ln 2) at max_input


def test_pwl_breakpoints_validate():
    with pytest.raises(ValueError):
        pwl_breakpoints(0.0)
    with pytest.raises(ValueError):
        pwl_breakpoints(1.0, 1)


# --- frontend layers ---------------------------------------------------------------------------------------------


def test_pwl_layer_matches_numpy_reference_after_training_step():
    layer = PWLCompression(max_input=2.0, num_segments=8)
    x = np.linspace(0, 3, 61, dtype="float32").reshape(1, 61, 1, 1)
    np.testing.assert_allclose(np.ravel(layer(x)), pwl_numpy(np.ravel(x), layer.breakpoints, layer.params.numpy()),
                               atol=1e-5)  # fmt: skip
    layer.params.assign(np.random.default_rng(0).normal(size=8).astype("float32"))
    np.testing.assert_allclose(np.ravel(layer(x)), pwl_numpy(np.ravel(x), layer.breakpoints, layer.params.numpy()),
                               atol=1e-5)  # fmt: skip


def test_mel_projection_equals_filterbank_product_and_can_be_frozen():
    cfg = tiny_audio("hybrid")
    fb = mel_filterbank(cfg)
    x = np.random.default_rng(1).random((2, fb.shape[1], 32, 1)).astype("float32")
    layer = MelProjection(fb, name="proj")
    y = np.asarray(layer(x))
    np.testing.assert_allclose(y[..., 0], np.einsum("mf,nft->nmt", fb, x[..., 0]), rtol=1e-5, atol=1e-6)
    assert len(layer.trainable_weights) == 1
    frozen = MelProjection(fb, trainable=False)
    frozen(x)
    assert not frozen.trainable_weights and len(frozen.non_trainable_weights) == 1


def test_mel_projection_rejects_wrong_input():
    with pytest.raises(ValueError, match="expects"):
        MelProjection(np.ones((4, 9), "float32"))(np.ones((1, 8, 5, 1), "float32"))


# --- builder -----------------------------------------------------------------------------------------------------


def conv_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def test_round_channels_multiples_of_eight():
    for c in (1, 7, 12.5, 33, 100, 250):
        r = round_channels(c)
        assert r % 8 == 0 and r >= 8 and r >= 0.9 * c


@pytest.mark.parametrize("alpha", [0.35, 0.5, 1.0, 1.3])
def test_every_channel_count_is_a_multiple_of_8(alpha):
    model = build_dscnn((32, 32, 1), 5, alpha=alpha, depth=2)
    for layer in conv_layers(model):
        if not isinstance(layer, keras.layers.DepthwiseConv2D):
            assert layer.filters % 8 == 0, layer.name
    assert not any(isinstance(layer, keras.layers.Dense) for layer in model.layers[:-3]), "Dense only in the head"


def test_alpha_and_depth_change_the_model():
    base = model_summary(build_dscnn((32, 32, 1), 4, stage_channels=TINY_STAGES))
    wide = model_summary(build_dscnn((32, 32, 1), 4, stage_channels=TINY_STAGES, alpha=2.0))
    deep = model_summary(build_dscnn((32, 32, 1), 4, stage_channels=TINY_STAGES, depth=3))
    assert wide["params"] > 2 * base["params"] and wide["macs"] > 2 * base["macs"]
    assert deep["params"] > base["params"]


def test_knobs_shape_the_graph():
    residual = build_dscnn((32, 32, 1), 3, depth=2, residual=True, se=True)
    plain = build_dscnn((32, 32, 1), 3, depth=2, residual=False, se=False)
    kinds = lambda m: {type(layer).__name__ for layer in m.layers}  # noqa: E731
    assert {"Add", "Multiply"} <= kinds(residual)
    assert not {"Add", "Multiply"} & kinds(plain)
    se_convs = [layer for layer in residual.layers if "_se_" in layer.name and isinstance(layer, keras.layers.Conv2D)]
    assert se_convs and all(layer.kernel_size == (1, 1) for layer in se_convs)


def test_outputs_softmax_or_sigmoid():
    x = np.random.default_rng(0).random((4, 32, 32, 1)).astype("float32")
    single = build_dscnn((32, 32, 1), 3, stage_channels=TINY_STAGES)(x)
    np.testing.assert_allclose(np.sum(single, axis=1), 1.0, atol=1e-5)
    multi = np.asarray(build_dscnn((32, 32, 1), 3, stage_channels=TINY_STAGES, multi_label=True)(x))
    assert multi.shape == (4, 3) and np.all((multi > 0) & (multi < 1))
    assert not np.allclose(multi.sum(axis=1), 1.0)


def test_bn_momentum_comes_from_model_config():
    model = build_model(tiny_audio(), ModelConfig(bn_momentum=0.9), 3)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(layer.momentum == 0.9 for layer in bns)


@pytest.mark.parametrize("frontend", ["mel", "hybrid"])
def test_build_model_follows_audio_config(frontend):
    cfg = tiny_audio(frontend)
    model = build_model(cfg, ModelConfig(alpha=0.5), 4)
    assert model.input_shape[1:] == input_shape(cfg)
    assert model.output_shape == (None, 4)
    names = [type(layer).__name__ for layer in model.layers]
    assert ("MelProjection" in names) == (frontend == "hybrid")
    assert "PWLCompression" in names
    if frontend == "hybrid":
        proj = model.get_layer("mel_projection")
        np.testing.assert_allclose(proj.kernel.numpy(), mel_filterbank(cfg).T)
    assert build_model(cfg, ModelConfig(), 4, batch_size=1).input_shape[0] == 1


@pytest.mark.parametrize("mag_scale", ["db", "none"])
def test_no_in_graph_scaling_for_db_and_none(mag_scale):
    model = build_model(tiny_audio("mel", mag_scale), ModelConfig(), 3)
    assert not any(isinstance(layer, PWLCompression) for layer in model.layers)


def test_frontend_trainable_flag():
    frozen = build_model(tiny_audio("hybrid"), ModelConfig(frontend_trainable=False), 3)
    assert not frozen.get_layer("mel_projection").trainable_weights
    trainable = build_model(tiny_audio("hybrid"), ModelConfig(frontend_trainable=True), 3)
    assert trainable.get_layer("mel_projection").trainable_weights


def test_bad_inputs_raise_user_errors():
    with pytest.raises(UserError, match="1 channel"):
        build_dscnn((16, 16, 3), 3)
    with pytest.raises(UserError, match="num_classes"):
        build_dscnn((16, 16, 1), 0)
    with pytest.raises(UserError, match="mag_scale"):
        build_dscnn((16, 16, 1), 3, mag_scale="log")
    with pytest.raises(UserError, match="alpha"):
        build_model(tiny_audio(), ModelConfig(alpha=0), 3)


def test_default_model_is_a_small_dscnn():
    summary = model_summary(build_model(AudioConfig(frontend="mel"), ModelConfig(), 10))
    assert 50_000 <= summary["params"] <= 150_000
    assert 5e6 <= summary["macs"] <= 60e6
    assert summary["input_shape"] == [64, 256, 1] and summary["num_classes"] == 10


# --- summary -----------------------------------------------------------------------------------------------------


def test_model_summary_counts_macs_weights_and_peak_memory_of_a_known_model():
    inputs = keras.Input((8, 16, 1))
    a = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)  # 8*16 * 9*1*8 MACs
    a = keras.layers.BatchNormalization()(a)
    a = keras.layers.ReLU(6.0)(a)
    b = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False)(a)  # 4*8 * 9*8
    c = keras.layers.Conv2D(16, 1, use_bias=False)(b)  # 4*8 * 8*16
    d = keras.layers.GlobalAveragePooling2D()(c)
    out = keras.layers.Dense(3)(d)  # 16*3
    s = model_summary(keras.Model(inputs, out))
    assert s["macs"] == 8 * 16 * 9 * 8 + 4 * 8 * 9 * 8 + 4 * 8 * 8 * 16 + 16 * 3
    assert s["params"] == 72 + 32 + 72 + 128 + 51
    assert s["int8_weight_bytes"] == (72 + 8 * 8) + (72 + 8 * 8) + (128 + 8 * 16) + (48 + 8 * 3)
    # largest live set: the conv's 8x16x8 output (BN/ReLU6 fold into it) while the depthwise writes 4x8x8
    assert s["peak_activation_bytes"] == 8 * 16 * 8 + 4 * 8 * 8
    text = format_summary(s)
    assert "parameters" in text and "MACs" in text and "KiB" in text


def test_peak_memory_keeps_skip_connections_alive():
    inputs = keras.Input((4, 4, 8))
    a = keras.layers.Conv2D(8, 1)(inputs)
    b = keras.layers.Conv2D(32, 1)(a)
    c = keras.layers.Conv2D(8, 1)(b)
    out = keras.layers.Add()([a, c])
    s = model_summary(keras.Model(inputs, out))
    # while c is computed: a (skip, 128 B), b (512 B) and c (128 B) are alive
    assert s["peak_activation_bytes"] == 128 + 512 + 128


# --- persistence and export --------------------------------------------------------------------------------------


def test_keras_file_reloads_in_safe_mode_with_identical_outputs(tmp_path):
    model = build_model(tiny_audio("hybrid"), ModelConfig(alpha=0.5, depth=1), 3)
    x = np.random.default_rng(2).random((3, *model.input_shape[1:])).astype("float32")
    model.get_layer("pwl").params.assign(np.linspace(-1, 1, 8).astype("float32"))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert isinstance(loaded.get_layer("pwl"), PWLCompression)


@pytest.mark.slow
def test_every_layer_quantizes_to_int8_builtins_with_static_shapes():
    from birdnet_stm32.export.audit import STM32N6_INT8_OPS, audit_tflite
    from birdnet_stm32.export.quantize import quantize_model

    cfg = tiny_audio("hybrid")
    model = build_model(cfg, ModelConfig(alpha=0.5, depth=2, se=True, residual=True), 3)
    x = np.random.default_rng(3).random((16, *model.input_shape[1:])).astype("float32")
    report = audit_tflite(quantize_model(model, x, ExportConfig()))
    assert report.passed, report.problems
    assert set(report.op_counts) <= set(STM32N6_INT8_OPS)
    names = [op.name for op in report.ops]
    # the mel projection is TRANSPOSE -> 1x1 CONV_2D -> TRANSPOSE; the PWL two CONV_2D, the first with RELU6
    assert names[:6] == ["QUANTIZE", "TRANSPOSE", "CONV_2D", "TRANSPOSE", "CONV_2D", "CONV_2D"]
    assert report.ops[4].fused_activation == "RELU6"
    assert {"ADD", "MUL", "LOGISTIC", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(names)
    assert all(-1 not in t.shape_signature for t in report.tensors)
