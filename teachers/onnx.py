"""insightface model-zoo ONNX files (w600k_r50.onnx, glintr100.onnx, ...) as frozen teachers via ONNX Runtime.

    build_teacher({"kind": "onnx", "checkpoint": "buffalo_l/w600k_r50.onnx"})

`OnnxTeacherModel` follows the torch-teacher contract: it takes a torch batch normalised (x/255-0.5)/0.5
(RGB, NCHW) and returns raw float32 embeddings on the batch's device. What differs between files is
read from the file, never assumed (docs/formats.md §5):
- the input name, element type and shape come from the session at run time;
- models converted from MXNet normalise inside the graph (a Sub and a Mul by constants applied to the
  input before anything else); they are fed raw 0..255 pixels, converted back as x*127.5+127.5;
- a batch dimension fixed in the file (often 1) is honoured by running the batch in chunks of that size.
Needs the `onnx` extra (`pip install 'facedistill[onnx]'`): onnx to inspect the graph, onnxruntime to run it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from distill.utils.digest import file_sha256
from distill.utils.errors import CheckpointError, ConfigError

# ops that may stand between the input and the in-graph normalisation without changing pixel values
_PASS_THROUGH = ("Identity", "Cast")
_ELEMENTWISE = ("Sub", "Mul", "Div", "Add")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _import_runtime():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(f"ONNX teachers and export need onnx and onnxruntime ({err}); "
                          f"install them with: pip install 'facedistill[onnx]'") from None
    return onnx, onnxruntime


def default_providers(onnxruntime) -> list:
    """CUDA when this onnxruntime build has it, else CPU. Not `get_available_providers()` as is:
    that can list providers (Azure, TensorRT) that need extra setup before they run anything."""
    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def normalises_inside(graph, input_name: str) -> bool:
    """True when the chain of nodes fed by the input holds a Sub and a Mul (or Div) by constants:
    the signature of MXNet-converted insightface models, which expect raw 0..255 pixels.

    Follows the data path rather than looking at the first nodes in file order, because Constant
    nodes often come first and a torch export names nodes differently from an MXNet conversion."""
    constants = {t.name for t in graph.initializer}
    constants |= {out for n in graph.node if n.op_type == "Constant" for out in n.output}
    consumers: dict = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ops, current = [], input_name
    for _ in range(8):
        nodes = consumers.get(current, [])
        if len(nodes) != 1:  # the input branches: whatever it is, it is not a plain rescale
            break
        node = nodes[0]
        if node.op_type in _ELEMENTWISE:
            others = [name for name in node.input if name != current]
            if not others or not all(name in constants for name in others):
                break
            ops.append(node.op_type)
        elif node.op_type not in _PASS_THROUGH:
            break
        current = node.output[0]
    return "Sub" in ops and ("Mul" in ops or "Div" in ops)


def _dim(d):
    """A fixed dimension as an int; a symbolic or unknown one (dynamic axis) as None."""
    return d if isinstance(d, int) and d > 0 else None


class OnnxTeacherModel(nn.Module):
    """An ONNX face-recognition model run by ONNX Runtime behind an nn.Module forward (no torch parameters).

    Attributes read from the file: `input_name`, `input_shape` (N, 3, H, W; None where dynamic),
    `input_size` (H when H == W and fixed, else None), `embedding_size`, `fixed_batch` (None when
    dynamic), `raw_pixels` (the graph normalises inside and takes 0..255 pixels).
    """

    def __init__(self, path, providers: list | None = None):
        super().__init__()
        onnx, ort = _import_runtime()
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: ONNX file not found; check teacher.onnx")
        self._sha256 = file_sha256(self.path)
        providers = self._check_providers(ort, providers)
        try:
            graph = onnx.load(self.path, load_external_data=False).graph
        except Exception as err:  # protobuf raises its own DecodeError types
            raise CheckpointError(f"{self.path}: not an ONNX file ({type(err).__name__}: {err}); "
                                  f"expected an insightface model-zoo .onnx file such as w600k_r50.onnx") from None
        if not graph.node or not graph.output:
            raise CheckpointError(f"{self.path}: not an ONNX model (no graph nodes or outputs found); "
                                  f"expected an insightface model-zoo .onnx file such as w600k_r50.onnx")
        options = ort.SessionOptions()
        # follow the thread count the user gave torch instead of taking every core
        options.intra_op_num_threads = torch.get_num_threads()
        # MXNet conversions warn about unused initializers on every load; errors are still reported
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.path, sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises pybind exception types without a common base
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load this model "
                                  f"({str(err).splitlines()[0][:300]})") from None
        self._read_signature()
        self.raw_pixels = normalises_inside(graph, self.input_name)

    @staticmethod
    def _check_providers(ort, providers):
        if providers is None:
            return default_providers(ort)
        if isinstance(providers, str):
            providers = [providers]
        available = ort.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ConfigError(f"teacher.providers: {unknown} not available in this onnxruntime build; "
                              f"available: {available}")
        return list(providers)

    def _read_signature(self):
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise CheckpointError(f"{self.path}: a face model has one input (an image batch); this one has "
                                  f"{len(inputs)}: {[i.name for i in inputs]}")
        inp = inputs[0]
        shape = list(inp.shape or [])
        if len(shape) != 4 or shape[1] != 3:
            raise CheckpointError(f"{self.path}: input {inp.name!r} has shape {shape}; a face teacher needs a "
                                  f"3-channel NCHW image batch (N, 3, H, W)")
        if inp.type not in _NUMPY_TYPES:
            raise CheckpointError(f"{self.path}: input {inp.name!r} is {inp.type}; only float32/float16 "
                                  f"image inputs are supported")
        out = outputs[0]
        if len(out.shape or []) != 2:
            raise CheckpointError(f"{self.path}: output {out.name!r} has shape {out.shape}; a face teacher "
                                  f"outputs a 2-D (N, embedding_size) batch of embeddings")
        self.input_name, self.output_name = inp.name, out.name
        self.input_dtype = _NUMPY_TYPES[inp.type]
        self.input_shape = tuple(_dim(d) for d in shape)
        self.fixed_batch = self.input_shape[0]
        h, w = self.input_shape[2:]
        self.input_size = h if h is not None and h == w else None
        self.embedding_size = _dim(out.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ConfigError(f"{self.path}: expected a (N, 3, H, W) batch, got shape {tuple(x.shape)}")
        h, w = self.input_shape[2:]
        if (h is not None and x.shape[2] != h) or (w is not None and x.shape[3] != w):
            raise ConfigError(f"{self.path}: the model takes {h}x{w} images, got {x.shape[2]}x{x.shape[3]}; "
                              f"set the data's image size to {h}")
        if self.raw_pixels:
            x = x * 127.5 + 127.5  # undo (p/255-0.5)/0.5: the graph applies its own (p-127.5)*0.0078125
        batch = x.detach().to("cpu", torch.float32).numpy().astype(self.input_dtype, copy=False)
        step = self.fixed_batch or len(batch) or 1
        out = [self._run(batch[i:i + step], step) for i in range(0, len(batch), step)]
        emb = np.concatenate(out) if out else np.zeros((0, self.embedding_size or 0), np.float32)
        return torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).to(x.device)

    def _run(self, chunk: np.ndarray, step: int) -> np.ndarray:
        n = len(chunk)
        if self.fixed_batch and n < step:  # last chunk of a fixed-batch model: pad, then drop the padding
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(chunk)})[0][:n]

    def fingerprint(self) -> str:
        """SHA-256 of the file's bytes, read when the session was created (no torch weights to hash)."""
        return self._sha256

    def extra_repr(self) -> str:
        return (f"path={self.path!r}, input={self.input_name!r} {self.input_shape}, "
                f"raw_pixels={self.raw_pixels}, providers={self.session.get_providers()}")
