"""The STM32N6 flatbuffer audit: it passes real int8 models and catches models built to break it."""

import subprocess
import sys

import numpy as np
import pytest

from birdnet_stm32.errors import UserError
from birdnet_stm32.export.audit import STM32N6_INT8_OPS, audit_tflite, format_audit

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")

X = np.random.default_rng(0).random((8, 8, 8, 1)).astype("float32")


def convert(model, *, int8=True, float_fallback=False):
    """Convert with TF directly, so the test can also make files our exporter would refuse to make."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([X[i : i + 1]] for i in range(len(X)))
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.target_spec.supported_ops = ops + ([tf.lite.OpsSet.TFLITE_BUILTINS] if float_fallback else [])
    return converter.convert()


def head(h):
    return keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))


@pytest.fixture(scope="module")
def good_tflite():
    i = keras.Input((8, 8, 1), batch_size=1)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu6")(i)
    h = keras.layers.DepthwiseConv2D(3, padding="same")(h)
    return convert(keras.Model(i, head(h)))


def problems(report, check):
    return [p for p in report.problems if p.check == check]


def test_good_int8_model_passes(good_tflite, tmp_path):
    report = audit_tflite(good_tflite)
    assert report.passed, format_audit(report)
    assert list(report.op_counts) == ["QUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED",
                                      "SOFTMAX", "DEQUANTIZE"]  # fmt: skip
    assert set(report.op_counts) <= set(STM32N6_INT8_OPS)
    io = report.io_details()
    assert io["inputs"][0]["dtype"] == "float32" and io["inputs"][0]["shape"] == [1, 8, 8, 1]
    assert io["inputs"][0]["int8_quantization"]["scale"] > 0
    conv = report.ops[1]
    weights, bias = (report.tensors[t] for t in conv.inputs[1:3])
    assert (weights.dtype, bias.dtype) == ("int8", "int32") and len(weights.scale) == 8  # per-channel
    assert conv.fused_activation == "RELU6"
    path = tmp_path / "m.tflite"
    path.write_bytes(good_tflite)
    assert audit_tflite(path).op_counts == report.op_counts
    assert report.size_bytes == len(good_tflite)
    d = report.to_dict()
    assert d["passed"] and d["ops"][1]["where"].startswith("NPU") and d["problems"] == []


def test_peak_activation_memory_of_a_chain(good_tflite):
    report = audit_tflite(good_tflite)
    # biggest live set: the float input (8*8*1*4 B) with its int8 copy at QUANTIZE is 320 B;
    # CONV_2D reads 64 B and writes 512 B; DEPTHWISE reads 512 B and writes 512 B -> 1024 B
    assert report.peak_activation_bytes == 1024


def test_dense_on_a_4d_tensor_is_caught():
    i = keras.Input((8, 8, 1), batch_size=1)
    h = keras.layers.Conv2D(8, 3, padding="same")(i)
    h = keras.layers.Dense(8)(h)  # Dense on a feature map
    report = audit_tflite(convert(keras.Model(i, head(h))))
    found = problems(report, "dense_on_4d")
    assert len(found) == 1 and found[0].op == "FULLY_CONNECTED" and "1x1 Conv2D" in found[0].message


def test_float_island_is_caught():
    i = keras.Input((8, 8, 1), batch_size=1)
    h = keras.layers.Conv2D(8, 3, padding="same")(i)
    h = keras.layers.Lambda(keras.ops.sin)(h)  # no int8 kernel: stays float between DEQUANTIZE and QUANTIZE
    report = audit_tflite(convert(keras.Model(i, head(h)), float_fallback=True))
    flagged = {p.op for p in problems(report, "float_op")}
    assert {"DEQUANTIZE", "SIN", "QUANTIZE"} <= flagged
    assert [p.op for p in problems(report, "op_allowed")] == ["SIN"]
    assert "PROBLEM [float_op]" in format_audit(report)


def test_dynamic_batch_and_shape_ops_and_odd_channels_are_caught():
    i = keras.Input((8, 8, 1))  # dynamic batch
    h = keras.layers.Conv2D(12, 3, padding="same")(i)  # 12 channels
    h = keras.layers.Reshape((-1,))(h)  # computed at run time from the dynamic batch
    report = audit_tflite(convert(keras.Model(i, keras.layers.Dense(3)(h))))
    messages = " | ".join(p.message for p in problems(report, "dynamic_shape"))
    assert "SHAPE computes shapes" in messages and "PACK computes shapes" in messages
    assert "RESHAPE target shape is computed at run time" in messages
    assert "dynamic shape [-1, 8, 8, 1]" in messages
    assert [p.op for p in problems(report, "channels")] == ["CONV_2D"]
    assert not report.passed


def test_float_model_is_caught():
    i = keras.Input((8, 8, 1), batch_size=1)
    h = keras.layers.Conv2D(8, 3, padding="same")(i)
    report = audit_tflite(convert(keras.Model(i, head(h)), int8=False))
    assert {p.op for p in problems(report, "float_op")} >= {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"}
    assert any("expected int8" in p.message for p in problems(report, "weight_type"))


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        audit_tflite(tmp_path / "missing.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(UserError, match="not a TFLite flatbuffer"):
        audit_tflite(junk)


def test_audit_does_not_import_tensorflow(good_tflite, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(good_tflite)
    code = (
        "import sys; from birdnet_stm32.export.audit import audit_tflite; "
        f"r = audit_tflite({str(path)!r}); assert r.passed; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
