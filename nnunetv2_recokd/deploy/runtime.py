"""One fold's network compiled by a CPU inference runtime, callable as a torch module.

On a CPU, PyTorch eager is overhead-bound on the narrow 3D convolutions of a distilled student: 16x fewer FLOPs
buy about 1.6x. Inference runtimes that fuse the graph and pick CPU kernels ahead of time do much better. The
path is the same for every runtime: the network (deep supervision off, one output) is exported to ONNX at the
configuration's patch size with batch 1 -- the only input shape nnU-Net's sliding window ever feeds it, since
smaller images are padded to the patch --, its skip concatenations are folded into the convolutions that read
them (deploy/graph.py), and the runtime compiles that file.

Runtimes (measured on this project's 2-core CPU, Hippocampus student patch 40x56x40, see README):
    openvino     OpenVINO, f32 precision forced (its CPU plugin would otherwise choose bf16 where the CPU has it,
                 which changes the logits far beyond fp32 rounding). The fastest: the default.
    onnxruntime  ONNX Runtime's CPU execution provider.
    torch        no runtime: PyTorch eager, as stock nnUNetv2_predict (for comparisons through one command).

Precisions (OpenVINO): f32 (the default), bf16 (opt-in), int8 (opt-in; NNCF post-training quantization calibrated
on the user's own cases, deploy/quantize.py).

OpenVINO and onnx come with the package; ONNX Runtime and NNCF (int8) with ``pip install 'nnunetv2-recokd[deploy]'``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from nnunetv2_recokd.deploy import quantize
from nnunetv2_recokd.deploy.graph import GRAPH_VERSION, split_concat_convs
from nnunetv2_recokd.deploy.modelfolder import DeployError

RUNTIMES = ("openvino", "onnxruntime", "torch")
DEFAULT_RUNTIME = "openvino"
ONNX_OPSET = 17
INSTALL_HINT = "pip install 'nnunetv2-recokd[deploy]'"
CACHE_ENV = "RECOKD_CACHE"
PRECISIONS = ("f32", "bf16", "int8")


def require_runtime(runtime: str) -> None:
    """Raise DeployError with the install command when the runtime (or onnx, needed to export) is missing."""
    if runtime not in RUNTIMES:
        raise DeployError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    needed = {"openvino": ("openvino", "onnx"), "onnxruntime": ("onnxruntime", "onnx"), "torch": ()}[runtime]
    for module in needed:
        if not _installed(module):
            raise DeployError(f"the {runtime} runtime needs the Python package {module!r}, which is not installed: "
                              f"{INSTALL_HINT} (or --runtime torch to run PyTorch as stock nnU-Net does)")


def _installed(module: str) -> bool:
    """Found, not imported: onnx alone takes 0.3-0.5 s to import and is only needed when a network is exported."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    return importlib.util.find_spec(module) is not None


def export_onnx(network: nn.Module, input_shape: Sequence[int], target: Union[str, Path, io.BytesIO],
                dynamic_batch: bool = False) -> None:
    """Export a single-output network to ONNX (input ``image``, output ``logits``).

    Args:
        network: the network with deep supervision off (nnU-Net's inference network).
        input_shape: (1, C, *patch); the spatial size is fixed to the patch nnU-Net's sliding window feeds.
        target: file path or buffer.
        dynamic_batch: leave the batch axis free (for users who batch patches themselves).
    """
    network = network.eval()
    example = torch.zeros(*input_shape)
    with torch.no_grad():
        out = network(example)
    if not isinstance(out, torch.Tensor):
        raise DeployError("the network returns several outputs (deep supervision on?); build it with "
                          "enable_deep_supervision=False")
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of torch.export (which needs onnxscript); instance norm
        # in eval mode with input statistics is what nnU-Net computes, the exporter's note about it is moot
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (example,), target if isinstance(target, io.BytesIO) else str(target),
                          input_names=["image"], output_names=["logits"], opset_version=ONNX_OPSET,
                          dynamic_axes=axes, dynamo=False)


class CompiledNetwork(nn.Module):
    """A runtime-compiled network with the torch interface nnU-Net's predictor uses (``net(x)``, ``.eval()``,
    ``.to()``). It accepts exactly the shape it was compiled for and returns a fresh float32 tensor (OpenVINO's
    output buffer is reused by the next call; nnU-Net adds mirrored predictions in place)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], input_shape: Sequence[int], runtime: str):
        super().__init__()
        self._run = run
        self.input_shape = tuple(int(s) for s in input_shape)
        self.runtime = runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.input_shape:
            raise DeployError(f"{self.runtime} network compiled for input {self.input_shape}, got {tuple(x.shape)}")
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(np.array(self._run(array), dtype=np.float32, copy=True))

    def extra_repr(self) -> str:
        return f"runtime={self.runtime}, input_shape={self.input_shape}"


def compile_network(network: nn.Module, input_shape: Sequence[int], runtime: str = DEFAULT_RUNTIME,
                    threads: Optional[int] = None, onnx_cache: Optional[Path] = None,
                    precision: str = "f32", optimize_graph: bool = True,
                    calibration: Optional[Callable[[], Sequence[np.ndarray]]] = None,
                    int8_cache: Optional[Path] = None, int8_file: Optional[Path] = None) -> nn.Module:
    """The network as the runtime runs it (``torch``: the network itself, in eval mode).

    Args:
        network: nnU-Net's inference network (deep supervision off) with the fold's weights loaded.
        input_shape: (1, C, *patch).
        runtime: one of RUNTIMES.
        threads: CPU threads of the runtime (None: the runtime's default, all cores).
        onnx_cache: ONNX file to reuse if it exists, else to write (atomically): the export is most of the set-up
            time of a prediction command (see onnx_cache_file).
        precision: "f32", or "bf16" (OpenVINO only, opt-in: faster on CPUs with bf16 units, logits no longer equal
            to PyTorch's to float32 rounding; see the README for its measured parity).
        optimize_graph: apply deploy/graph.py's rewrites to the exported graph (equal to float32 summation order;
            False compiles the plain export, for comparisons).
        calibration: int8 only: returns the calibration tiles (1, C, *patch); called only when the int8 network is
            neither given (int8_file) nor cached (int8_cache).
        int8_cache: int8 only: where the quantized network is cached (an OpenVINO .xml path; None: not cached).
        int8_file: int8 only: an already quantized network (``export --precision int8``), used as it is.
    """
    require_runtime(runtime)
    if precision not in PRECISIONS or (precision != "f32" and runtime != "openvino"):
        raise DeployError(f"precision {precision!r} is available for: f32 (every runtime), bf16 and int8 (openvino)")
    if runtime == "torch":
        return network.eval()
    if precision == "int8":
        for ready in (int8_file, int8_cache):  # exported with the model, or quantized before: no export, no NNCF
            if ready is not None and ready.is_file() and ready.with_suffix(".bin").is_file():
                return CompiledNetwork(_openvino(ready, threads, "f32"), input_shape, runtime)
        quantize.require_nncf()
        if calibration is None:
            raise DeployError("int8 needs calibration tiles (or an int8 network from export --precision int8)")
    with tempfile.TemporaryDirectory(prefix="recokd_onnx_") as tmp:
        onnx_file = Path(tmp) / "network.onnx"
        if onnx_cache is not None and onnx_cache.is_file():
            onnx_file = onnx_cache
        else:
            export_onnx(network, input_shape, onnx_file)
            if optimize_graph:
                import onnx
                onnx.save(split_concat_convs(onnx.load(str(onnx_file)))[0], str(onnx_file))
            if onnx_cache is not None:
                _store(onnx_file, onnx_cache)
        if runtime == "openvino" and precision == "int8":
            # int8 layers run in int8; what stays unquantized runs in f32 (not bf16: the f32 hint)
            run = _openvino(quantize.int8_model(onnx_file, calibration, int8_cache), threads, "f32")
        elif runtime == "openvino":
            run = _openvino(onnx_file, threads, precision)
        else:
            run = _onnxruntime(onnx_file, threads)
    return CompiledNetwork(run, input_shape, runtime)


def default_cache_dir() -> Path:
    """$RECOKD_CACHE, else ~/.cache/nnunetv2_recokd."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nnunetv2_recokd")


def onnx_cache_file(checkpoint: Path, input_shape: Sequence[int], cache_dir: Optional[Path] = None,
                    optimize_graph: bool = True) -> Path:
    """Where the ONNX export of this checkpoint at this input shape is cached. The key covers the checkpoint's path,
    size and modification time, the shape, torch's version, the opset and the graph rewrites' version (or none),
    so a retrained or replaced checkpoint gets a new file."""
    stat = checkpoint.stat()
    key = "|".join(map(str, (checkpoint.resolve(), stat.st_size, stat.st_mtime_ns, tuple(input_shape),
                             torch.__version__, ONNX_OPSET, GRAPH_VERSION if optimize_graph else "plain")))
    return (cache_dir or default_cache_dir()) / "onnx" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".onnx")


def _store(source: Path, target: Path) -> None:
    """Copy into the cache atomically; a cache that cannot be written is skipped (it only saves time)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    except OSError as e:
        warnings.warn(f"ONNX cache not written ({e}); set {CACHE_ENV} to a writable folder to reuse exports")


def _openvino(model, threads: Optional[int], precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """model: an ONNX or OpenVINO IR file, or an openvino.Model."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model)) if isinstance(model, (str, Path)) else model, "CPU",
                                  config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer([x])[output]
    return run


def _onnxruntime(onnx_file: Path, threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(onnx_file.read_bytes(), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"image": x})[0]
    return run


def max_logit_difference(reference: nn.Module, compiled: nn.Module, x: torch.Tensor) -> float:
    """max |reference(x) - compiled(x)| over one input (the parity figure the predict command reports)."""
    with torch.no_grad():
        return float((reference.eval()(x) - compiled(x)).abs().max())
