"""ONNX networks through onnxruntime: a callable that takes and returns torch tensors, so that
``NetworkModel`` prepares the input and checks and reduces the logits the same way for every kind.

On a GPU actor the session runs on CUDA (``CUDAExecutionProvider``; CPU for the operators CUDA
lacks), elsewhere on the CPU with the actor's threads. Inputs and outputs cross as host arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.errors import ModelError, one_line


def input_shape(path: str) -> list[int | str | None]:
    """The graph's first input's declared shape (ints for fixed axes, names or None for dynamic ones)."""
    session = _session(path, device="cpu", threads=1)
    return list(session.get_inputs()[0].shape)


def _session(path: str, *, device: str, threads: int | None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # an optional extra
        raise ModelError(f"{path}: model.kind onnx needs onnxruntime: pip install 'raymask[onnx]'") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would land on the console per actor
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            # measured on an H100: the CPU provider ran a small CNN 14x slower than the GPU kinds; never silently
            raise ModelError(
                f"{path}: this actor has a GPU, but onnxruntime {ort.__version__} has no CUDA execution provider: "
                "pip install onnxruntime-gpu there, or set runtime.gpus_per_actor: 0 to run the graph on CPUs"
            )
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid graphs
        raise ModelError(f"{path}: not an ONNX graph onnxruntime can load ({one_line(exc, 160)})") from exc


class OnnxNetwork:
    """``network(x)`` for an N x C x ... float32 tensor: the graph's first output as a tensor on x's device."""

    def __init__(self, path: str, *, device: str = "cpu") -> None:
        self.session = _session(path, device=device, threads=torch.get_num_threads())
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelError(f"{path}: the graph has {len(inputs)} inputs ({names}); raymask feeds one image tensor")
        self.input = inputs[0].name
        channels = inputs[0].shape[1] if len(inputs[0].shape) > 1 else None
        self.in_channels = channels if isinstance(channels, int) else None
        self.providers = self.session.get_providers()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        host = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run(None, {self.input: host})[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)
