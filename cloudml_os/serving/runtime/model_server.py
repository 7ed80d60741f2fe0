"""The model server a serving replica runs: one model, TF Serving's REST API and KServe's v2 protocol.

The platform uploads this one file to a node and runs it with the node's framework runtime python, so it
imports only the standard library, numpy and the framework it serves — never ``cloudml_os``::

    python model_server.py --framework TENSORFLOW|MXNET|PYTORCH --model-dir DIR --model-name NAME \\
        --host ADDR --port PORT [--warmup-instances JSON]

It listens first (``GET /v2/health/live`` is 200 from then on), then loads the model and runs a warm-up
prediction; only when both succeeded is it ready (``GET /v2/health/ready`` 200, state ``AVAILABLE``).
A model that does not load or warm up is logged and ends the process with status 1, never having been
ready. SIGTERM (or SIGINT) drains: not ready at once, no new connections, requests in flight finish
(up to ``--drain-seconds``), exit 0.

Endpoints (``NAME`` is ``--model-name``; ``/versions/1`` may follow it, the only version there is):

- TF Serving: ``GET /v1/models/NAME`` (version status), ``POST /v1/models/NAME:predict``
  ``{"instances": [...]}`` → ``{"predictions": [...]}``. An instance is a value (nested lists) or, as TF
  Serving's row format allows, an object ``{input_name: value}``. One output gives one value per
  instance, several give one object per instance.
- Open Inference Protocol (KServe v2, with Triton's binary tensor data extension, which tritonclient uses by
  default): ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``GET /v2/models/NAME`` (metadata), ``GET /v2/models/NAME/ready``, ``POST /v2/models/NAME/infer``
  (tensors as JSON, or as bytes after the JSON with ``Inference-Header-Content-Length``; BYTES tensors only as
  JSON).

Errors are ``{"error": message}``: 400 for a request the model cannot take (the framework's message when
it is the one that refused), 404 for another model or path, 405 for a wrong method, 503 while not ready,
500 ``internal error`` for anything unexpected (its traceback goes to the log only).

Warm-up instances: ``--warmup-instances`` (JSON text, or the path of a JSON file) if given, else
``MODEL_DIR/warmup.json`` if present, else for TensorFlow one row of zeros shaped by the signature
(unknown dimensions 1), else ``[[0.0]]``.

Threads: one per connection (HTTP/1.1 keep-alive, so a router can pool connections). TensorFlow and
TorchScript models are called concurrently, both being thread-safe for inference; MXNet calls are
serialised by a lock, its engine not being safe for inference from several threads at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import http.server
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings

import numpy as np

LOG = logging.getLogger("model_server")
VERSION = "1"  # the model directory holds one model: it is version 1
MAX_BODY_BYTES = 64 * 1024 * 1024
PLATFORMS = {"TENSORFLOW": "tensorflow_savedmodel", "MXNET": "mxnet_symbol", "PYTORCH": "pytorch_torchscript"}
# Open Inference Protocol datatypes a request may declare; values are cast to the model's input dtype.
V2_DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
                "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
V1_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?::(?P<verb>[^/]*))?$")
V2_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+?)(?:/versions/(?P<version>[^/]+))?(?:/(?P<verb>ready|infer))?$")


class RequestError(Exception):
    """A request answered with ``status`` and ``{"error": message}``; ``close`` ends the connection after."""

    def __init__(self, status: int, message: str, *, allow: str = "", close: bool = False):
        super().__init__(message)
        self.status, self.message, self.allow, self.close = status, message, allow, close


def bad_request(message: str) -> RequestError:
    return RequestError(400, message)


@dataclasses.dataclass
class Tensor:
    """An input or output of the model: ``shape`` uses -1 for a dimension of any size, None when unknown."""

    name: str
    dtype: np.dtype
    shape: list[int] | None = None

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": v2_datatype(self.dtype),
                "shape": self.shape if self.shape is not None else [-1]}


def v2_datatype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    for name, numpy_type in V2_DATATYPES.items():
        if dtype == numpy_type:
            return name
    return "BYTES"


def framework_message(error: BaseException) -> str:
    """The line of a framework's exception that says what was wrong, without its stack traces."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    noise = ("Traceback", "Detected at node", "<stack traces", "Graph execution error")
    useful = [line for line in lines if not line[0].isspace() and not line.startswith(noise)]
    message = (useful or lines or [type(error).__name__])[-1].strip()
    message = re.sub(r"^(?:[\w.]*(?:Error|Exception)):\s*", "", message)
    return message[:1000] or type(error).__name__


# -- the frameworks ------------------------------------------------------------------------------------

class TensorFlowModel:
    """A SavedModel's ``serving_default`` signature, called with keyword arguments (its input names)."""

    def __init__(self, model_dir: str):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        import tensorflow as tf

        self._tf = tf
        self._loaded = tf.saved_model.load(model_dir)  # the signature needs its object kept alive
        signatures = dict(self._loaded.signatures)
        if "serving_default" not in signatures:
            raise RuntimeError(f"the SavedModel in {model_dir} has no serving_default signature "
                               f"(it has {sorted(signatures)})")
        self._signature = signatures["serving_default"]
        self._specs = self._signature.structured_input_signature[1]
        self.inputs = [Tensor(name, np.dtype(spec.dtype.as_numpy_dtype), tf_shape(spec.shape))
                       for name, spec in sorted(self._specs.items())]
        self.outputs = [Tensor(name, np.dtype(spec.dtype.as_numpy_dtype), tf_shape(spec.shape))
                        for name, spec in sorted(self._signature.structured_outputs.items())]

    def default_instances(self) -> list:
        """One row of zeros shaped by the signature, unknown dimensions 1."""
        row = {}
        for tensor in self.inputs:
            shape = [1 if size < 0 else size for size in (tensor.shape or [1, 1])[1:]]
            row[tensor.name] = np.zeros(shape, tensor.dtype).tolist()
        return [row] if len(row) > 1 else list(row.values())

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in inputs.items():
            spec = self._specs[name]
            if not spec.shape.is_compatible_with(array.shape):
                raise bad_request(f"input '{name}' must have shape {tf_shape(spec.shape)} (-1: any size), "
                                  f"got {list(array.shape)}")
        try:
            result = self._signature(**{name: self._tf.constant(array) for name, array in inputs.items()})
        except (self._tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
            raise bad_request(framework_message(error)) from error
        return {name: tensor.numpy() for name, tensor in result.items()}


def tf_shape(shape) -> list[int] | None:
    return None if shape.rank is None else [-1 if size is None else int(size) for size in shape.as_list()]


class MXNetModel:
    """``PREFIX-symbol.json`` + ``PREFIX-0000.params`` as a Gluon ``SymbolBlock``; calls serialised."""

    def __init__(self, model_dir: str):
        import mxnet as mx

        self._mx = mx
        symbol_file, params_file = mxnet_files(model_dir)
        symbol = mx.sym.load(symbol_file)
        # HybridBlock.export names its inputs data (data0, data1… for several); the rest are parameters.
        parameters = {key.split(":", 1)[-1] for key in mx.nd.load(params_file)}
        names = [name for name in symbol.list_inputs() if name not in parameters] or ["data"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "cannot decide type for data": it is float32, given at each call
            self._net = mx.gluon.SymbolBlock.imports(symbol_file, names, params_file, ctx=mx.cpu())
        self._lock = threading.Lock()  # the MXNet engine is not safe for inference from several threads
        self.inputs = [Tensor(name, np.dtype(np.float32)) for name in names]
        self.outputs = [Tensor(name, np.dtype(np.float32)) for name in symbol.list_outputs()]

    def default_instances(self) -> list:
        return [[0.0]]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mx = self._mx
        with self._lock:
            try:
                result = self._net(*[mx.nd.array(inputs[tensor.name]) for tensor in self.inputs])
                results = result if isinstance(result, list | tuple) else [result]
                arrays = [array.asnumpy() for array in results]  # the engine is asynchronous: errors show here
            except mx.base.MXNetError as error:
                raise bad_request(framework_message(error)) from error
        names = [tensor.name for tensor in self.outputs]
        if len(names) != len(arrays):
            names = [f"output_{index}" for index in range(len(arrays))]
        return dict(zip(names, arrays, strict=True))


def mxnet_files(model_dir: str) -> tuple[str, str]:
    """The model's symbol and epoch-0 parameters; ``model-`` first when there are several."""
    symbols = sorted(glob.glob(os.path.join(glob.escape(model_dir), "*-symbol.json")),
                     key=lambda path: (os.path.basename(path) != "model-symbol.json", path))
    for symbol_file in symbols:
        params_file = symbol_file[:-len("-symbol.json")] + "-0000.params"
        if os.path.isfile(params_file):
            return symbol_file, params_file
    raise FileNotFoundError(f"no PREFIX-symbol.json beside a PREFIX-0000.params in {model_dir}")


class PyTorchModel:
    """``model.pt`` (TorchScript) on the CPU; its ``forward`` arguments are the inputs, in order."""

    def __init__(self, model_dir: str):
        import torch

        self._torch = torch
        self._module = torch.jit.load(os.path.join(model_dir, "model.pt"), map_location="cpu").eval()
        arguments = self._module.forward.schema.arguments[1:]  # the first is self
        names = [argument.name for argument in arguments if not argument.has_default_value()] or ["input"]
        self.inputs = [Tensor(name, np.dtype(np.float32)) for name in names]
        self.outputs = None  # known after the first prediction
        out_of_memory = getattr(torch, "OutOfMemoryError", None)
        self._not_the_input = (out_of_memory,) if out_of_memory else ()

    def default_instances(self) -> list:
        return [[0.0]]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        tensors = [torch.as_tensor(inputs[tensor.name]) for tensor in self.inputs]
        try:
            with torch.inference_mode():
                result = self._module(*tensors)
        except self._not_the_input:
            raise
        except (RuntimeError, ValueError, TypeError) as error:
            raise bad_request(framework_message(error)) from error
        if isinstance(result, torch.Tensor):
            outputs = {"output": result}
        elif isinstance(result, list | tuple):
            outputs = {f"output_{index}": value for index, value in enumerate(result)}
        elif isinstance(result, dict):
            outputs = {str(name): value for name, value in result.items()}
        else:
            outputs = {"output": result}
        if not all(isinstance(value, torch.Tensor) for value in outputs.values()):
            raise RequestError(500, f"the model returned {type(result).__name__} holding non-tensors")
        return {name: value.detach().cpu().numpy() for name, value in outputs.items()}


FRAMEWORKS = {"TENSORFLOW": TensorFlowModel, "MXNET": MXNetModel, "PYTORCH": PyTorchModel}


# -- requests to arrays and back -----------------------------------------------------------------------

def to_array(values, tensor: Tensor, what: str) -> np.ndarray:
    """Nested lists of numbers as an array of the tensor's dtype; 400 for anything else."""
    if tensor.dtype.kind not in "iufb":
        raise bad_request(f"input '{tensor.name}' has dtype {tensor.dtype}: this server takes numbers only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy < 1.24 warns about ragged lists and makes objects of them
        try:
            array = np.asarray(values)
        except (ValueError, TypeError) as error:
            raise bad_request(f"{what} must be numbers in nested lists of equal lengths: {error}") from error
    if array.dtype.kind not in ("iufb" if tensor.dtype.kind == "b" else "iuf"):
        found = {"U": "strings", "S": "strings", "b": "booleans"}.get(
            array.dtype.kind, "lists of unequal lengths or values that are not numbers")
        raise bad_request(f"{what} must be numbers in nested lists of equal lengths (found {found})")
    return array.astype(tensor.dtype, copy=False)


def instances_to_inputs(instances, tensors: list[Tensor]) -> dict[str, np.ndarray]:
    """TF Serving's row format: a list of values, or of objects ``{input_name: value}``."""
    if not isinstance(instances, list):
        raise bad_request("'instances' must be a list, one entry per instance")
    if not instances:
        raise bad_request("'instances' is empty")
    names = [tensor.name for tensor in tensors]
    objects = [isinstance(instance, dict) for instance in instances]
    if not any(objects):
        if len(tensors) != 1:
            raise bad_request(f"this model has inputs {names}: give each instance as an object with those keys")
        return {tensors[0].name: to_array(instances, tensors[0], "instances")}
    if not all(objects):
        raise bad_request("instances must be all objects {input_name: value} or all values, not a mix")
    for index, instance in enumerate(instances):
        unknown = sorted(set(instance) - set(names))
        if unknown:
            raise bad_request(f"instance {index} has unknown inputs {unknown}; the model's inputs are {names}")
    inputs = {}
    for tensor in tensors:
        missing = [index for index, instance in enumerate(instances) if tensor.name not in instance]
        if missing:
            raise bad_request(f"instance {missing[0]} lacks input '{tensor.name}'")
        inputs[tensor.name] = to_array([instance[tensor.name] for instance in instances], tensor,
                                       f"values of input '{tensor.name}'")
    return inputs


def outputs_to_predictions(outputs: dict[str, np.ndarray], batch: int) -> list:
    """One prediction per instance: the output's row, or an object of every output's row."""
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != batch:
            raise RequestError(500, f"output '{name}' has shape {list(array.shape)}: its first dimension "
                               f"is not the {batch} instances")
    if len(outputs) == 1:
        return next(iter(outputs.values())).tolist()
    rows = {name: array.tolist() for name, array in outputs.items()}
    return [{name: values[index] for name, values in rows.items()} for index in range(batch)]


def v2_inputs(request: dict, tensors: list[Tensor], binary: bytes = b"") -> dict[str, np.ndarray]:
    """``{"inputs": [{"name", "shape", "datatype", "data"}]}`` as arrays of the model's inputs; an input with
    ``parameters.binary_data_size`` instead of ``data`` takes its bytes from ``binary`` (the binary tensor
    data extension: the tensors' bytes after the JSON, in the inputs' order)."""
    items = request.get("inputs")
    offset = 0
    if not isinstance(items, list) or not items:
        raise bad_request("'inputs' must be a non-empty list of {name, shape, datatype, data}")
    by_name = {tensor.name: tensor for tensor in tensors}
    inputs = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request("each input must be an object with a 'name'")
        name = item["name"]
        if name not in by_name:
            raise bad_request(f"unknown input '{name}'; the model's inputs are {list(by_name)}")
        if name in inputs:
            raise bad_request(f"input '{name}' is given twice")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(size, int) and not isinstance(size, bool)
                                                  and size >= 0 for size in shape):
            raise bad_request(f"input '{name}': 'shape' must be a list of non-negative integers")
        datatype = item.get("datatype")
        if datatype not in V2_DATATYPES:
            raise bad_request(f"input '{name}': datatype {datatype!r} is not supported; "
                              f"use one of {sorted(V2_DATATYPES)}")
        size = (item.get("parameters") or {}).get("binary_data_size") if isinstance(item.get("parameters"), dict) \
            else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise bad_request(f"input '{name}': binary_data_size {size!r} does not fit the "
                                  f"{len(binary) - offset} bytes of binary data left")
            array = from_binary(binary[offset:offset + size], datatype, by_name[name], name)
            offset += size
        elif "data" in item:
            array = to_array(item["data"], by_name[name], f"data of input '{name}'")
        else:
            raise bad_request(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        if array.size != math.prod(shape):
            raise bad_request(f"input '{name}': shape {shape} holds {math.prod(shape)} values, "
                              f"data has {array.size}")
        inputs[name] = array.reshape(shape)
    missing = [name for name in by_name if name not in inputs]
    if missing:
        raise bad_request(f"missing inputs {missing}")
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data are not any input's")
    return inputs


def from_binary(data: bytes, datatype: str, tensor: Tensor, name: str) -> np.ndarray:
    """A tensor's binary data (little-endian, row major) as an array of the model input's dtype."""
    if datatype == "BYTES":
        raise bad_request(f"input '{name}': BYTES tensors are not supported; this server takes numbers only")
    element = np.dtype(V2_DATATYPES[datatype]).newbyteorder("<")
    if len(data) % element.itemsize:
        raise bad_request(f"input '{name}': {len(data)} bytes are not whole {datatype} values")
    return to_array(np.frombuffer(data, dtype=element), tensor, f"data of input '{name}'")


def v2_outputs(request: dict, outputs: dict[str, np.ndarray]) -> tuple[list[dict], bytes]:
    """The response's outputs, and the binary data of those asked for as binary (in their order)."""
    wanted = request.get("outputs")
    parameters = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    all_binary = parameters.get("binary_data_output") is True
    asked = [{"name": name} for name in outputs]
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(item, dict) for item in wanted):
            raise bad_request("'outputs' must be a list of {name}")
        asked = wanted
        unknown = [item.get("name") for item in asked if item.get("name") not in outputs]
        if unknown:
            raise bad_request(f"unknown outputs {unknown}; the model's outputs are {list(outputs)}")
    described, binary = [], []
    for item in asked:
        name = item["name"]
        array = outputs[name]
        output = {"name": name, "shape": list(array.shape), "datatype": v2_datatype(array.dtype)}
        own = (item.get("parameters") or {}).get("binary_data") if isinstance(item.get("parameters"), dict) else None
        if (all_binary if own is None else own is True) and output["datatype"] != "BYTES":
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            output["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        else:
            output["data"] = array.ravel().tolist()
        described.append(output)
    return described, b"".join(binary)


def parse_json(body: bytes) -> dict:
    if not body.strip():
        raise bad_request("the request has no body; expected a JSON object")
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise bad_request(f"invalid JSON: {error}") from error
    if not isinstance(request, dict):
        raise bad_request("the request body must be a JSON object")
    return request


def load_warmup_instances(option: str | None, model_dir: str, model) -> tuple[list, str]:
    """The warm-up instances and where they came from."""
    if option:
        text, source = option, "--warmup-instances"
        if not option.lstrip().startswith(("[", "{")) and os.path.isfile(option):
            with open(option, encoding="utf-8") as handle:
                text, source = handle.read(), option
        instances = json.loads(text)
    elif os.path.isfile(os.path.join(model_dir, "warmup.json")):
        with open(os.path.join(model_dir, "warmup.json"), encoding="utf-8") as handle:
            instances, source = json.load(handle), "warmup.json"
    else:
        instances = model.default_instances()
        source = "the signature" if isinstance(model, TensorFlowModel) else "the default"
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"warm-up instances from {source} must be a non-empty JSON list")
    return instances, source


# -- the server ----------------------------------------------------------------------------------------

class GpuDutyMeter:
    """The node's GPUs' duty cycle integrated over time, for autoscaling on GPU_DUTY_CYCLE.

    A thread asks ``nvidia-smi`` once a second for ``utilization.gpu`` (the percent of the last sample period
    in which a kernel ran) of the GPUs this process may use, and adds their mean to a counter of busy
    GPU-seconds; readers difference two readings, as for the other counters.
    """

    def __init__(self, nvidia_smi: str, devices: str, interval: float = 1.0):
        self._command = [nvidia_smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        if devices:
            self._command.append(f"--id={devices}")
        self._interval = interval
        self._busy, self._duty, self._since = 0.0, 0.0, time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def for_this_node(cls) -> GpuDutyMeter | None:
        """A meter of the GPUs ``CUDA_VISIBLE_DEVICES`` gives (all when unset), or None without any."""
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        nvidia_smi = shutil.which("nvidia-smi")
        if devices == "" or not nvidia_smi:
            return None
        meter = cls(nvidia_smi, devices or "")
        return meter if meter._sample() is not None else None

    def start(self) -> None:
        threading.Thread(target=self._run, name="gpu-duty", daemon=True).start()

    def read(self) -> float:
        """Busy GPU-seconds so far (averaged over the GPUs)."""
        with self._lock:
            now = time.monotonic()
            self._busy += self._duty * (now - self._since)
            self._since = now
            return self._busy

    def _sample(self) -> float | None:
        try:
            out = subprocess.run(self._command, capture_output=True, text=True, timeout=10, check=True).stdout
            values = [float(line) for line in out.split() if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return sum(values) / len(values) / 100 if values else None

    def _run(self) -> None:
        while True:
            duty = self._sample()
            if duty is not None:
                self.read()  # what the previous duty cycle earned up to now
                with self._lock:
                    self._duty = duty
            time.sleep(self._interval)


class ModelServer:
    """What every request thread shares: the model once loaded, its state, the requests in flight.

    ``handle`` answers one request without touching sockets: ``(status, body, headers)``.
    """

    def __init__(self, framework: str, model_name: str, model_dir: str, gpu_meter: GpuDutyMeter | None = None):
        self.framework, self.model_name, self.model_dir = framework, model_name, model_dir
        self.gpu_meter = gpu_meter
        self.model = None
        self.state = "LOADING"  # → AVAILABLE → UNLOADING, or → END when loading failed
        self.error = ""
        self.draining = False
        self._in_flight = 0
        self._idle = threading.Condition()
        self._predicting = 0  # the requests in flight that are predictions (POSTs), not probes
        self._busy = 0.0  # the integral of _predicting over time (request-seconds), for autoscaling
        self._busy_since = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.state == "AVAILABLE"

    def load(self, warmup_option: str | None) -> None:
        """Load the model and predict the warm-up instances; ready only if both succeed.

        :raises Exception: whatever stopped either; the state is then END.
        """
        started = time.monotonic()
        try:
            model = FRAMEWORKS[self.framework](self.model_dir)
            LOG.info("loaded %s model from %s in %.2f s", self.framework, self.model_dir, time.monotonic() - started)
            instances, source = load_warmup_instances(warmup_option, self.model_dir, model)
            warmup_started = time.monotonic()
            inputs = instances_to_inputs(instances, model.inputs)
            outputs = model.predict(inputs)
            outputs_to_predictions(outputs, len(instances))
        except Shutdown:
            raise
        except RequestError as error:
            self._fail(f"the warm-up prediction failed: {error.message}")
            raise RuntimeError(self.error) from error
        except BaseException as error:
            self._fail(f"{type(error).__name__}: {framework_message(error)}")
            raise
        for tensor in model.inputs:
            if tensor.shape is None:
                tensor.shape = [-1, *inputs[tensor.name].shape[1:]]
        if model.outputs is None:
            model.outputs = [Tensor(name, array.dtype) for name, array in outputs.items()]
        for tensor in model.outputs:
            if tensor.shape is None and tensor.name in outputs:
                tensor.shape = [-1, *outputs[tensor.name].shape[1:]]
        self.model = model
        # The framework leaves a few hundred thousand long-lived objects on the heap; without this every
        # full collection walks them all (130-190 ms, stalling every request thread at once under load).
        gc.freeze()
        self.state = "AVAILABLE"
        LOG.info("warm-up: %d instances from %s predicted in %.3f s; ready %.2f s after the start",
                 len(instances), source, time.monotonic() - warmup_started, time.monotonic() - started)

    def _fail(self, message: str) -> None:
        self.state, self.error = "END", message

    def start_draining(self) -> None:
        self.draining = True
        if self.state == "AVAILABLE":
            self.state = "UNLOADING"

    def request_started(self, prediction: bool) -> None:
        with self._idle:
            self._count_busy()
            self._in_flight += 1
            self._predicting += prediction

    def request_ended(self, prediction: bool) -> None:
        with self._idle:
            self._count_busy()
            self._in_flight -= 1
            self._predicting -= prediction
            if not self._in_flight:
                self._idle.notify_all()

    def _count_busy(self) -> float:
        now = time.monotonic()
        self._busy += self._predicting * (now - self._busy_since)
        self._busy_since = now
        return now

    def load_header(self) -> str:
        """The load counters the autoscaler reads with each readiness probe (cloudml_os.serving.autoscaler's
        ``Load``): this clock, prediction-seconds in flight (probes do not count: an idle server reads 0),
        process CPU seconds, cores, the predictions in flight, and busy GPU-seconds when the node has GPUs."""
        gpu = f"; gpu={self.gpu_meter.read():.6f}" if self.gpu_meter is not None else ""
        with self._idle:
            now = self._count_busy()
            return (f"time={now:.6f}; busy={self._busy:.6f}; cpu={time.process_time():.6f}; "
                    f"cpus={os.cpu_count() or 1}; in_flight={self._predicting}{gpu}")

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    # -- routing

    def handle(self, method: str, target: str, body: bytes, header_length: int | None = None) -> tuple[int, dict, dict]:
        """(status, JSON answer or (JSON answer, binary data), headers) for one request. ``header_length``:
        the request's Inference-Header-Content-Length (its JSON is that many first bytes of ``body``)."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
        if path == "/v2/health/live":
            allow(method, "GET")
            return 200, {"live": True}, {}
        if path == "/v2/health/ready":
            allow(method, "GET")
            return (200 if self.ready else 503), {"ready": self.ready}, {"X-Cloudml-Load": self.load_header()}
        if path == "/v2":
            allow(method, "GET")
            return 200, {"name": "cloudml-os-model-server", "version": VERSION,
                         "extensions": ["binary_tensor_data"]}, {}
        match = V1_PATH.match(path)
        if match:
            self._check_model(match["name"], match["version"])
            if match["verb"] is None:
                allow(method, "GET")
                return 200, self._v1_status(), {}
            if match["verb"] != "predict":
                raise RequestError(404, f"':{match['verb']}' is not served here; use ':predict'")
            allow(method, "POST")
            return 200, self._v1_predict(parse_json(body)), {}
        match = V2_MODEL_PATH.match(path)
        if match:
            self._check_model(match["name"], match["version"])
            if match["verb"] is None:
                allow(method, "GET")
                return 200, self._v2_metadata(), {}
            if match["verb"] == "ready":
                allow(method, "GET")
                return (200 if self.ready else 503), {"name": self.model_name, "ready": self.ready}, {}
            allow(method, "POST")
            if header_length is None:
                return 200, self._v2_infer(parse_json(body), b""), {}
            if not 0 <= header_length <= len(body):
                raise bad_request(f"Inference-Header-Content-Length {header_length} is not within the "
                                  f"{len(body)} bytes of the body")
            return 200, self._v2_infer(parse_json(body[:header_length]), body[header_length:]), {}
        raise RequestError(404, f"no such endpoint: {path}")

    def _check_model(self, name: str, version: str | None) -> None:
        if name != self.model_name:
            raise RequestError(404, f"model '{name}' is not served here (this server serves '{self.model_name}')")
        if version is not None and version != VERSION:
            raise RequestError(404, f"model '{name}' has no version '{version}' (it has '{VERSION}')")

    def _ready_model(self):
        model = self.model
        if model is None or self.state == "END":
            raise RequestError(503, f"model '{self.model_name}' is not ready (state {self.state})")
        return model

    def _v1_status(self) -> dict:
        if self.state == "END":
            status = {"error_code": "UNKNOWN", "error_message": self.error}
        else:
            status = {"error_code": "OK", "error_message": ""}
        return {"model_version_status": [{"version": VERSION, "state": self.state, "status": status}]}

    def _v1_predict(self, request: dict) -> dict:
        model = self._ready_model()
        if request.get("signature_name") not in (None, "", "serving_default"):
            raise bad_request(f"unknown signature_name {request['signature_name']!r}; use 'serving_default'")
        if "instances" not in request:
            raise bad_request("the request needs 'instances' (the columnar 'inputs' format is not supported)")
        instances = request["instances"]
        outputs = model.predict(instances_to_inputs(instances, model.inputs))
        return {"predictions": outputs_to_predictions(outputs, len(instances))}

    def _v2_metadata(self) -> dict:
        metadata = {"name": self.model_name, "versions": [VERSION], "platform": PLATFORMS[self.framework]}
        model = self.model
        if model is not None:
            metadata["inputs"] = [tensor.metadata() for tensor in model.inputs]
            if model.outputs is not None:
                metadata["outputs"] = [tensor.metadata() for tensor in model.outputs]
        return metadata

    def _v2_infer(self, request: dict, binary: bytes) -> dict | tuple[dict, bytes]:
        """The answer; with binary outputs, (its JSON, their bytes)."""
        model = self._ready_model()
        outputs = model.predict(v2_inputs(request, model.inputs, binary))
        described, data = v2_outputs(request, outputs)
        response = {"model_name": self.model_name, "model_version": VERSION, "outputs": described}
        if "id" in request:
            response["id"] = request["id"]
        return (response, data) if any("parameters" in output for output in described) else response


def allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise RequestError(405, f"{method} is not allowed here; use {allowed}", allow=allowed)


def json_default(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: every answer is JSON with a Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "cloudml-os-model-server/" + VERSION
    disable_nagle_algorithm = True  # headers and body go out as two writes: no delayed-ACK stall
    server: HTTPServer

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # an idle keep-alive connection ends after this
        super().setup()

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_PUT(self) -> None:
        self._answer("PUT")

    def do_DELETE(self) -> None:
        self._answer("DELETE")

    def do_PATCH(self) -> None:
        self._answer("PATCH")

    def _answer(self, method: str) -> None:
        app = self.server.app
        prediction = method == "POST"  # :predict and infer; what the autoscaler counts
        app.request_started(prediction)
        try:
            headers = {}
            try:
                status, payload, headers = app.handle(method, self.path, self._read_body(), self._header_length())
            except RequestError as error:
                status, payload = error.status, {"error": error.message}
                if error.allow:
                    headers = {"Allow": error.allow}
                if error.close:
                    self.close_connection = True
                if status >= 500:
                    LOG.error("%s %s: %d %s", method, self.path, status, error.message)
                elif status != 503:  # readiness probes while loading are expected
                    LOG.warning("%s %s: %d %s", method, self.path, status, error.message)
            except Exception:
                LOG.exception("%s %s: internal error", method, self.path)
                status, payload = 500, {"error": "internal error"}
            self._send(status, payload, headers)
        finally:
            app.request_ended(prediction)

    def _header_length(self) -> int | None:
        value = self.headers.get("Inference-Header-Content-Length")
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise RequestError(400, f"invalid Inference-Header-Content-Length {value!r}") from None

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            size = int(length)
            if size < 0:
                raise ValueError(length)
        except ValueError as error:
            raise RequestError(400, f"invalid Content-Length {length!r}", close=True) from error
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes", close=True)
        return self.rfile.read(size)

    def _read_chunked(self) -> bytes:
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as error:
                raise RequestError(400, "invalid chunked encoding", close=True) from error
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes", close=True)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _send(self, status: int, payload: dict | tuple[dict, bytes], headers: dict) -> None:
        binary = None
        if isinstance(payload, tuple):  # the binary tensor data extension: the JSON, then the tensors' bytes
            payload, binary = payload
        data = json.dumps(payload, separators=(",", ":"), default=json_default).encode()
        try:
            self.send_response(status)
            if binary is not None:
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Inference-Header-Content-Length", str(len(data)))
                data += binary
            else:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            if self.server.app.draining:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away
            self.close_connection = True

    def log_request(self, code="-", size="-") -> None:
        pass  # errors are logged by _answer; a line per prediction would cost more than it tells

    def log_error(self, format: str, *args) -> None:
        level = logging.DEBUG if format.startswith("Request timed out") else logging.WARNING  # idle keep-alive
        LOG.log(level, "%s: %s", self.address_string(), format % args)


class HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold the exit
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: ModelServer, idle_timeout: float):
        self.app, self.idle_timeout = app, idle_timeout
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, RequestHandler)

    def server_bind(self) -> None:
        # http.server's own looks the host's name up in DNS (socket.getfqdn): slow where a node has no DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            LOG.debug("connection from %s: %s", client_address, error)
        else:
            LOG.exception("connection from %s failed", client_address)


class Shutdown(Exception):
    """SIGTERM or SIGINT arrived while the model was loading."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="model_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--framework", required=True, type=str.upper, choices=sorted(FRAMEWORKS))
    parser.add_argument("--model-dir", required=True, help="the exported model")
    parser.add_argument("--model-name", required=True, help="the NAME in /v1/models/NAME and /v2/models/NAME")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--warmup-instances", default=None,
                        help="JSON list of instances (or a JSON file's path) to predict before being ready")
    parser.add_argument("--idle-timeout", type=float, default=300.0,
                        help="seconds an idle keep-alive connection is kept")
    parser.add_argument("--drain-seconds", type=float, default=10.0,
                        help="on SIGTERM, how long requests in flight may take to finish")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s model_server %(levelname)s %(message)s")
    gpu_meter = GpuDutyMeter.for_this_node()
    if gpu_meter is not None:
        gpu_meter.start()
    app = ModelServer(args.framework, args.model_name, args.model_dir, gpu_meter)
    try:
        httpd = HTTPServer((args.host, args.port), app, args.idle_timeout)
    except OSError as error:
        LOG.error("cannot listen on %s:%d: %s", args.host, args.port, error)
        return 1
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True).start()
    LOG.info("listening on %s:%d; loading %s model '%s' from %s", args.host, args.port, args.framework,
             args.model_name, args.model_dir)

    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        first = not stop.is_set()
        stop.set()
        if first and app.state == "LOADING":
            raise Shutdown(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app.load(args.warmup_instances)
        stop.wait()
        LOG.info("stopping: draining requests in flight (up to %.0f s)", args.drain_seconds)
    except Shutdown as signalled:
        LOG.info("stopping: %s while loading", signalled)
    except Exception:
        LOG.exception("the model did not load or warm up; exiting")
        httpd.shutdown()
        httpd.server_close()
        return 1
    app.start_draining()
    httpd.shutdown()
    httpd.server_close()
    if not app.wait_idle(args.drain_seconds):
        LOG.warning("requests still in flight after %.0f s; exiting anyway", args.drain_seconds)
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
