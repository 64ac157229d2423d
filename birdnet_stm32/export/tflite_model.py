"""Run a ``.tflite`` model on the host like a Keras model: float arrays in, float scores out.

:class:`TFLiteModel` wraps ``ai_edge_litert.interpreter.Interpreter`` so that evaluation and the export's
fidelity check can treat a quantized flatbuffer exactly like a ``keras.Model``: it quantizes float inputs
with the input tensor's scale and zero point when the model has int8 input, dequantizes int8 outputs, and
feeds a batch-1 model one example at a time.

The interpreter is created without the default XNNPACK delegate (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``).
XNNPACK replaces whole subgraphs with its own kernels, which round int8 arithmetic differently from
TFLite's builtin kernels and hide the operators actually in the file; the builtin kernels follow the
TFLite int8 reference arithmetic that TFLite Micro and the STM32 tooling implement, so the numbers
measured here are the ones the microcontroller will produce (up to rounding in the NPU's requantizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from birdnet_stm32.errors import UserError


class TFLiteModel:
    """A ``.tflite`` classifier with a Keras-like ``predict``.

    Args:
        path: The ``.tflite`` file, or the flatbuffer as bytes.
        num_threads: CPU threads for the interpreter (``None`` = the runtime's default).

    Raises:
        UserError: The file is missing or is not a loadable TFLite model, or the model does not have
            exactly one input and one output.

    Examples:
        >>> model = TFLiteModel("runs/demo/model_int8.tflite")  # doctest: +SKIP
        >>> scores = model.predict(features.x)  # (N, H, W, 1) float32 -> (N, C) float32  # doctest: +SKIP
    """

    def __init__(self, path: str | Path | bytes, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        if isinstance(path, bytes):
            source, kwargs = "<bytes>", {"model_content": path}
        else:
            source = str(path)
            if not Path(path).is_file():
                raise UserError(f"{source}: TFLite model file does not exist")
            kwargs = {"model_path": source}
        try:
            self._interpreter = Interpreter(
                **kwargs,
                num_threads=num_threads,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"{source}: not a loadable TFLite model ({str(exc).splitlines()[0]})") from None
        self.source = source
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{source}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
        self._dynamic_batch = int(inputs[0]["shape_signature"][0]) == -1
        self._batch = None if self._dynamic_batch else int(inputs[0]["shape"][0])
        self._interpreter.allocate_tensors()

    @property
    def input_details(self) -> dict[str, Any]:
        """The interpreter's details of the single input tensor (``shape``, ``dtype``, ``quantization``, ...)."""
        return self._interpreter.get_input_details()[0]

    @property
    def output_details(self) -> dict[str, Any]:
        """The interpreter's details of the single output tensor (``shape``, ``dtype``, ``quantization``, ...)."""
        return self._interpreter.get_output_details()[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch axis, e.g. ``(64, 256, 1)``."""
        return tuple(int(d) for d in self.input_details["shape"][1:])

    @property
    def num_classes(self) -> int:
        """Number of output scores per example."""
        return int(self.output_details["shape"][-1])

    def predict(self, x: np.ndarray, batch_size: int | None = None, verbose: bool = False) -> np.ndarray:
        """Run the model on a batch of float inputs.

        Args:
            x: Inputs of shape ``(N, *input_shape)`` in float units (the same features the Keras model
                takes); quantized here when the model has int8 input.
            batch_size: Examples per interpreter call. A model with a static batch (batch 1 for every
                model this package exports) always runs its own batch size; for a dynamic batch the
                input is resized to this many examples (default 64).
            verbose: Show a progress bar.

        Returns:
            Scores of shape ``(N, num_classes)``, float32, dequantized when the model has int8 output.

        Raises:
            UserError: ``x`` does not match the model's input shape.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise UserError(
                f"{self.source}: input of shape {tuple(x.shape[1:])} per example does not match the model's "
                f"{self.input_shape}"
            )
        step = (batch_size or 64) if self._dynamic_batch else self._batch
        in_index = self.input_details["index"]
        out_index = self.output_details["index"]
        out = np.empty((len(x), self.num_classes), dtype=np.float32)
        starts = range(0, len(x), step)
        for start in tqdm(starts, desc="tflite", unit="batch", disable=not verbose, leave=False):
            chunk = x[start : start + step]
            n = len(chunk)
            if self._dynamic_batch:
                if int(self.input_details["shape"][0]) != n:
                    self._interpreter.resize_tensor_input(in_index, [n, *self.input_shape])
                    self._interpreter.allocate_tensors()
            elif n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n, *self.input_shape), np.float32)])
            self._interpreter.set_tensor(in_index, quantize(chunk, self.input_details))
            self._interpreter.invoke()
            out[start : start + n] = dequantize(self._interpreter.get_tensor(out_index), self.output_details)[:n]
        return out


def quantize(x: np.ndarray, details: dict[str, Any]) -> np.ndarray:
    """Convert float values to a tensor's storage type with its scale and zero point.

    ``q = clip(round(x / scale) + zero_point, qmin, qmax)``; float tensors pass through unchanged.

    Args:
        x: Float values.
        details: The interpreter's tensor details (``dtype`` and ``quantization``).

    Returns:
        ``x`` in the tensor's dtype.

    Examples:
        >>> quantize(np.array([0.0, 0.5, 9.0]), {"dtype": np.int8, "quantization": (0.1, -3)}).tolist()
        [-3, 2, 87]
    """
    dtype = np.dtype(details["dtype"])
    if dtype.kind == "f":
        return np.asarray(x, dtype=dtype)
    scale, zero_point = details["quantization"]
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, details: dict[str, Any]) -> np.ndarray:
    """Convert a tensor's stored values to float32: ``(q - zero_point) * scale``.

    Args:
        q: Stored values.
        details: The interpreter's tensor details (``dtype`` and ``quantization``).

    Returns:
        Float32 values.

    Examples:
        >>> dequantize(np.array([-3, 2], np.int8), {"dtype": np.int8, "quantization": (0.1, -3)}).tolist()
        [0.0, 0.5]
    """
    if np.dtype(details["dtype"]).kind == "f":
        return np.asarray(q, dtype=np.float32)
    scale, zero_point = details["quantization"]
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)
