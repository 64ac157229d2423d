"""STM32N6 audit of a ``.tflite`` flatbuffer, read from the file without running it (no TensorFlow).

:func:`audit_tflite` parses the flatbuffer with the LiteRT schema and checks what the STM32N6's
Neural-ART NPU needs to run a model entirely in int8:

* ``op_allowed``: every operator is on :data:`STM32N6_INT8_OPS`;
* ``float_op``: no operator inside the graph reads or writes a float tensor; float is allowed only on
  the model's input (into the first QUANTIZE) and output (out of the last DEQUANTIZE);
* ``dynamic_shape``: batch 1 and no ``-1`` in any tensor's shape signature; no SHAPE, PACK, FILL or
  other shape-computing operators; RESHAPE only with a constant target shape;
* ``dense_on_4d``: no FULLY_CONNECTED on a tensor of rank > 2 (a ``Dense`` on a feature map; use a
  1x1 Conv2D);
* ``weight_type``: int8 weights and int32 biases for CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED,
  and int8 for every other constant operand;
* ``channels``: CONV_2D and DEPTHWISE_CONV_2D outputs have a multiple of 8 channels (the NPU
  processes channels in groups of 8); single-channel spectrogram planes are exempt, and so is the
  classifier's FULLY_CONNECTED, whose width is the number of classes.

## Where the operator list comes from

:data:`STM32N6_INT8_OPS` is distilled from ST's "ST Neural-ART NPU - Supported operators and
limitations" (ST Edge AI Core 2.2 / 3.0,
https://stedgeai-dc.st.com/assets/embedded-docs/stneuralart_operator_support.html), which maps each
operator of an int8 (8-bit activations / 8-bit per-channel weights) model to the NPU (``HW``) or to
software on the Cortex-M55 (``SW_INT``/``SW_FLOAT``), and from its TFLite import list
(https://stedgeai-dc.st.com/assets/embedded-docs/supported_ops_tflite.html). Only operators that run
in integer arithmetic are listed; each entry says where it runs. The list is a conservative subset
that covers what this package's models use plus common int8 layers; ``stedgeai analyze`` on the
exported file remains the final word, and a newer ST Edge AI Core may map more operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from birdnet_stm32.errors import UserError

#: TFLite builtin operators an int8 model may contain, with where the STM32N6 runs them.
STM32N6_INT8_OPS: dict[str, str] = {
    "CONV_2D": "NPU (kernel height <= 3 and width <= 6 native; larger kernels are decomposed)",
    "DEPTHWISE_CONV_2D": "NPU",
    "FULLY_CONNECTED": "NPU",
    "ADD": "NPU",
    "SUB": "NPU",
    "MUL": "NPU (element-wise or per-channel broadcast)",
    "MAXIMUM": "NPU",
    "MINIMUM": "NPU",
    "RELU": "NPU",
    "RELU6": "NPU",
    "LEAKY_RELU": "NPU",
    "PRELU": "NPU",
    "HARD_SWISH": "NPU",
    "LOGISTIC": "NPU",
    "TANH": "NPU",
    "AVERAGE_POOL_2D": "NPU (windows <= 3x3 native; larger windows are decomposed)",
    "MAX_POOL_2D": "NPU (windows <= 3x3 native; larger windows are decomposed)",
    "MEAN": "NPU as global average pooling over the spatial axes of a 4-D tensor",
    "CONCATENATION": "NPU",
    "PAD": "NPU",
    "RESHAPE": "NPU (memory layout only, constant target shape)",
    "SQUEEZE": "NPU (memory layout only)",
    "TRANSPOSE": "NPU",
    "SOFTMAX": "Cortex-M55, int8 (SW_INT), at the model output",
    "QUANTIZE": "float -> int8 at the model input, or int8 requantization",
    "DEQUANTIZE": "int8 -> float at the model output",
}

#: Operators that compute shapes at run time; the NPU needs every shape fixed at compile time.
DYNAMIC_SHAPE_OPS = frozenset({"SHAPE", "PACK", "UNPACK", "FILL", "RANGE", "BROADCAST_TO", "WHILE", "IF"})

#: Operators with a weight tensor (input 1) and an optional bias (input 2).
WEIGHTED_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})

_FUSED_ACTIVATIONS = {0: "", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}


@dataclass
class Problem:
    """One finding of the audit.

    Args:
        op_index: Position of the operator in execution order (``-1`` for the model's inputs/outputs).
        op: Operator name, e.g. ``"CONV_2D"`` (``"model"`` for input/output findings).
        check: Which check failed (see the module docstring).
        message: What is wrong, in one line.
    """

    op_index: int
    op: str
    check: str
    message: str


@dataclass
class TensorInfo:
    """A tensor as read from the flatbuffer.

    Args:
        name: Tensor name.
        dtype: NumPy dtype name (``"int8"``, ``"float32"``, ...).
        shape: Static shape.
        shape_signature: Shape with ``-1`` for dynamic dimensions (equals ``shape`` when static).
        scale: Quantization scales (empty when not quantized).
        zero_point: Quantization zero points.
        constant: Whether the tensor holds constant data (weights, biases, shapes).
    """

    name: str
    dtype: str
    shape: list[int]
    shape_signature: list[int]
    scale: list[float] = field(default_factory=list)
    zero_point: list[int] = field(default_factory=list)
    constant: bool = False

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def quantization(self) -> dict[str, Any] | None:
        """Per-tensor ``{"scale", "zero_point"}`` (or lists when per-channel); ``None`` when not quantized."""
        if not self.scale:
            return None
        if len(self.scale) == 1:
            return {"scale": self.scale[0], "zero_point": self.zero_point[0]}
        return {"scale": self.scale, "zero_point": self.zero_point}


@dataclass
class OpInfo:
    """An operator as read from the flatbuffer.

    Args:
        index: Position in execution order.
        name: Builtin operator name (``"CUSTOM:<code>"`` for custom operators).
        inputs: Tensor indices of the inputs (``-1`` for an omitted optional input).
        outputs: Tensor indices of the outputs.
        fused_activation: Fused activation (``"RELU6"``, ...) or ``""``.
    """

    index: int
    name: str
    inputs: list[int]
    outputs: list[int]
    fused_activation: str = ""


@dataclass
class AuditReport:
    """What :func:`audit_tflite` read and found.

    Args:
        ops: Operators in execution order.
        tensors: All tensors of the main subgraph.
        inputs: Tensor indices of the model inputs.
        outputs: Tensor indices of the model outputs.
        size_bytes: Size of the flatbuffer.
        problems: Findings; empty when the model passes.
    """

    ops: list[OpInfo]
    tensors: list[TensorInfo]
    inputs: list[int]
    outputs: list[int]
    size_bytes: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """``True`` when the audit found no problem."""
        return not self.problems

    @property
    def op_counts(self) -> dict[str, int]:
        """Number of operators of each type, in order of first appearance."""
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.name] = counts.get(op.name, 0) + 1
        return counts

    @property
    def peak_activation_bytes(self) -> int:
        """Estimated peak activation memory: the largest sum of non-constant tensors alive at once.

        A tensor is alive from the operator that writes it (or the start, for model inputs) to
        the last operator that reads it (or the end, for model outputs). Real allocators need at
        least this much; the ST compiler's may differ by its alignment and tiling.
        """
        last_use = {t: len(self.ops) for t in self.outputs}
        for op in self.ops:
            for t in op.inputs:
                if t >= 0 and not self.tensors[t].constant:
                    last_use[t] = max(last_use.get(t, -1), op.index)
        alive = set(self.inputs)
        peak = sum(self.tensors[t].nbytes for t in alive)
        for op in self.ops:
            alive.update(t for t in op.outputs if t >= 0)
            peak = max(peak, sum(self.tensors[t].nbytes for t in alive))
            alive = {t for t in alive if last_use.get(t, -1) > op.index}
        return int(peak)

    def io_details(self) -> dict[str, list[dict[str, Any]]]:
        """Model inputs and outputs: name, dtype, shape and quantization.

        For float32 I/O, ``int8_quantization`` gives the scale and zero point of the int8 tensor the
        input is quantized to (by the first QUANTIZE) or the output is dequantized from.
        """

        def describe(t: int, edge_op: str, edge_side: str) -> dict[str, Any]:
            info = self.tensors[t]
            out = {"name": info.name, "dtype": info.dtype, "shape": info.shape, "quantization": info.quantization()}
            for op in self.ops:
                if op.name == edge_op and t in getattr(op, edge_side):
                    other = op.outputs[0] if edge_side == "inputs" else op.inputs[0]
                    out["int8_quantization"] = self.tensors[other].quantization()
            return out

        return {
            "inputs": [describe(t, "QUANTIZE", "inputs") for t in self.inputs],
            "outputs": [describe(t, "DEQUANTIZE", "outputs") for t in self.outputs],
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: operators (with tensor types), counts, I/O, size, peak memory and problems."""
        ops = []
        for op in self.ops:
            ops.append({
                "index": op.index,
                "op": op.name,
                "fused_activation": op.fused_activation or None,
                "where": STM32N6_INT8_OPS.get(op.name, "not supported by the NPU"),
                "inputs": [_tensor_brief(self.tensors[t]) for t in op.inputs if t >= 0],
                "outputs": [_tensor_brief(self.tensors[t]) for t in op.outputs if t >= 0],
            })  # fmt: skip
        return {
            "passed": self.passed,
            "size_bytes": self.size_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
            "op_counts": self.op_counts,
            **self.io_details(),
            "ops": ops,
            "problems": [vars(p) for p in self.problems],
        }


def audit_tflite(model: bytes | str | Path) -> AuditReport:
    """Read a ``.tflite`` flatbuffer and check it against the STM32N6 rules (see the module docstring).

    Args:
        model: The flatbuffer bytes or the path of a ``.tflite`` file.

    Returns:
        The :class:`AuditReport`; ``report.passed`` is ``True`` when there is no problem.

    Raises:
        UserError: The file is missing or is not a TFLite flatbuffer.

    Examples:
        >>> report = audit_tflite("runs/demo/model_int8.tflite")  # doctest: +SKIP
        >>> report.passed, report.op_counts["CONV_2D"]  # doctest: +SKIP
        (True, 23)
    """
    data, source = _read_bytes(model)
    from ai_edge_litert import schema_py_generated as schema

    if not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise UserError(f"{source}: not a TFLite flatbuffer (file identifier 'TFL3' missing)")
    fb = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    if not fb.subgraphs:
        raise UserError(f"{source}: TFLite model has no subgraph")
    sg = fb.subgraphs[0]
    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    tensors = [_tensor_info(t, fb.buffers, type_names) for t in sg.tensors]
    ops = []
    for i, op in enumerate(sg.operators or []):
        code = fb.operatorCodes[op.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        name = op_names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = f"CUSTOM:{(code.customCode or b'').decode(errors='replace')}"
        activation = getattr(op.builtinOptions, "fusedActivationFunction", 0) if op.builtinOptions else 0
        ops.append(OpInfo(i, name, [int(t) for t in _as_list(op.inputs)], [int(t) for t in _as_list(op.outputs)],
                          _FUSED_ACTIVATIONS.get(int(activation), str(activation))))  # fmt: skip
    report = AuditReport(ops, tensors, [int(t) for t in _as_list(sg.inputs)], [int(t) for t in _as_list(sg.outputs)],
                         len(data))  # fmt: skip
    if len(fb.subgraphs) > 1:
        message = f"{len(fb.subgraphs)} subgraphs (control flow); the NPU runs one static graph"
        report.problems.append(Problem(-1, "model", "dynamic_shape", message))
    report.problems.extend(_check_io(report))
    for op in ops:
        report.problems.extend(_check_op(op, report))
    return report


def format_audit(report: AuditReport) -> str:
    """Format the audit as a short text block: operator counts, I/O, memory and every problem.

    Args:
        report: The audit.

    Returns:
        A multi-line string.
    """
    lines = [f"STM32N6 audit: {'PASSED' if report.passed else f'{len(report.problems)} problem(s)'}"]
    lines.append("  operators: " + ", ".join(f"{name} x{n}" for name, n in report.op_counts.items()))
    for kind, items in report.io_details().items():
        for item in items:
            q = item["quantization"] or item.get("int8_quantization")
            qtext = f" (int8 scale={q['scale']:.6g} zero_point={q['zero_point']})" if q else ""
            lines.append(f"  {kind[:-1]}: {item['dtype']} {item['shape']}{qtext}")
    size, peak = report.size_bytes / 1024, report.peak_activation_bytes / 1024
    lines.append(f"  file size {size:.1f} KiB, peak activations ~{peak:.1f} KiB")
    for p in report.problems:
        where = "model" if p.op_index < 0 else f"op {p.op_index} {p.op}"
        lines.append(f"  PROBLEM [{p.check}] {where}: {p.message}")
    return "\n".join(lines)


def _read_bytes(model: bytes | str | Path) -> tuple[bytes, str]:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), "<bytes>"
    path = Path(model)
    if not path.is_file():
        raise UserError(f"{path}: TFLite model file does not exist")
    return path.read_bytes(), str(path)


def _as_list(values: Any) -> list[Any]:
    return [] if values is None else list(values)


def _tensor_info(t: Any, buffers: list[Any], type_names: dict[int, str]) -> TensorInfo:
    shape = [int(d) for d in _as_list(t.shape)]
    signature = [int(d) for d in _as_list(t.shapeSignature)] or shape
    q = t.quantization
    scale = [float(s) for s in _as_list(q.scale)] if q is not None else []
    zero_point = [int(z) for z in _as_list(q.zeroPoint)] if q is not None else []
    buf = buffers[t.buffer] if 0 < t.buffer < len(buffers) else None
    constant = buf is not None and ((buf.data is not None and len(buf.data) > 0) or int(buf.offset or 0) > 0)
    name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
    return TensorInfo(name, type_names.get(int(t.type), f"type{t.type}"), shape, signature, scale, zero_point, constant)


def _tensor_brief(t: TensorInfo) -> str:
    return f"{t.dtype}{t.shape}{' const' if t.constant else ''}"


def _is_float(t: TensorInfo) -> bool:
    return t.dtype.startswith("float") or t.dtype == "bfloat16"


def _check_io(report: AuditReport) -> list[Problem]:
    problems = []
    for kind, indices in (("input", report.inputs), ("output", report.outputs)):
        for t in indices:
            info = report.tensors[t]
            if info.shape and info.shape[0] != 1:
                problems.append(
                    Problem(-1, "model", "dynamic_shape", f"{kind} '{info.name}' has batch {info.shape[0]}, not 1")
                )
            if -1 in info.shape_signature:
                problems.append(Problem(-1, "model", "dynamic_shape",
                                        f"{kind} '{info.name}' has dynamic shape {info.shape_signature}"))  # fmt: skip
            if info.dtype not in ("int8", "float32"):
                problems.append(
                    Problem(-1, "model", "float_op", f"{kind} '{info.name}' is {info.dtype}, not int8 or float32")
                )
    return problems


def _check_op(op: OpInfo, report: AuditReport) -> list[Problem]:
    tensors = report.tensors
    ins = [tensors[t] for t in op.inputs if t >= 0]
    outs = [tensors[t] for t in op.outputs if t >= 0]
    problems: list[Problem] = []

    def add(check: str, message: str) -> None:
        problems.append(Problem(op.index, op.name, check, message))

    if op.name not in STM32N6_INT8_OPS:
        add("op_allowed", f"{op.name} is not on the STM32N6 int8 operator list")
    edge_quantize = op.name == "QUANTIZE" and all(t in report.inputs for t in op.inputs)
    edge_dequantize = op.name == "DEQUANTIZE" and all(t in report.outputs for t in op.outputs)
    float_in = [t for t in ins if _is_float(t) and not (edge_quantize and not t.constant)]
    float_out = [t for t in outs if _is_float(t) and not edge_dequantize]
    if float_in or float_out:
        names = ", ".join(f"'{t.name}' ({t.dtype})" for t in float_in + float_out)
        add("float_op", f"float tensor(s) inside the graph: {names}; this runs on the CPU in float")
    if op.name in DYNAMIC_SHAPE_OPS:
        add("dynamic_shape", f"{op.name} computes shapes at run time")
    for t in ins + outs:
        if -1 in t.shape_signature:
            add("dynamic_shape", f"tensor '{t.name}' has dynamic shape {t.shape_signature}")
            break
    if op.name == "RESHAPE" and len(op.inputs) > 1 and op.inputs[1] >= 0 and not tensors[op.inputs[1]].constant:
        add("dynamic_shape", "RESHAPE target shape is computed at run time")
    if op.name == "FULLY_CONNECTED" and ins and len(ins[0].shape) > 2:
        add("dense_on_4d", f"FULLY_CONNECTED on a rank-{len(ins[0].shape)} tensor {ins[0].shape}; use a 1x1 Conv2D")
    if op.name in WEIGHTED_OPS:
        problems.extend(_check_weights(op, tensors))
    else:
        for t in ins:
            if (
                t.constant
                and t.dtype not in ("int8", "int32")
                and op.name not in ("RESHAPE", "TRANSPOSE", "PAD", "MEAN")
            ):
                add("weight_type", f"constant '{t.name}' is {t.dtype}, expected int8")
    if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D") and outs:
        channels = outs[0].shape[-1]
        if channels != 1 and channels % 8:
            add("channels", f"{channels} output channels; the NPU wants a multiple of 8")
    return problems


def _check_weights(op: OpInfo, tensors: list[TensorInfo]) -> list[Problem]:
    problems = []
    if len(op.inputs) > 1 and op.inputs[1] >= 0:
        w = tensors[op.inputs[1]]
        if not w.constant:
            problems.append(Problem(op.index, op.name, "weight_type", f"weights '{w.name}' are not constant"))
        elif w.dtype != "int8":
            problems.append(
                Problem(op.index, op.name, "weight_type", f"weights '{w.name}' are {w.dtype}, expected int8")
            )
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        b = tensors[op.inputs[2]]
        if b.dtype != "int32":
            problems.append(Problem(op.index, op.name, "weight_type", f"bias '{b.name}' is {b.dtype}, expected int32"))
    return problems
