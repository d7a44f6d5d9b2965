"""Fused kernels beside the torch path of the head, behind PartialFC's one `backend` switch.

Nothing here imports triton at import time: a plain CPU install never needs it. The head asks
`select_backend` which path a step takes; a forced backend that cannot run raises instead of
falling back.

Layering: kernels are compute only (no torch.distributed). They produce one rank's partial
statistics and gradients; the cross-rank arithmetic stays in hybrid_fc.head.loss (its
`TritonTiles` mode), shared with the torch path.
"""
import importlib.util
import os

import torch

__all__ = ["BACKENDS", "check_backend", "select_backend", "triton_available", "interpret_mode",
           "load_triton_ce"]

BACKENDS = ("auto", "torch", "triton")
# False until the GPU suite has passed on a GPU (see select_backend).
TRITON_ON_CUDA_BY_DEFAULT = False


def check_backend(backend, what: str = "backend") -> str:
    """`backend` validated: one of BACKENDS (ValueError naming `what` otherwise)."""
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got "
                         f"{backend!r}")
    return backend


def triton_available() -> bool:
    """triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """TRITON_INTERPRET=1: triton runs kernels on CPU tensors through its interpreter. It must
    be set before the kernel module is first imported (triton decides at decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def select_backend(backend: str, device: torch.device) -> str:
    """'torch' or 'triton' for a step on `device`.

    auto: torch for now. The kernels are verified against the float64 reference only under
    Triton's CPU interpreter; no GPU has compiled and checked them yet, and an unverified path
    must not be a silent default. Once `pytest -m gpu` has passed on a GPU, auto becomes
    "triton on CUDA when triton is importable" (TRITON_ON_CUDA_BY_DEFAULT).
    triton: raises RuntimeError when the kernels cannot run here; never falls back.
    """
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return ("triton" if TRITON_ON_CUDA_BY_DEFAULT and device.type == "cuda"
                and triton_available() else "torch")
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package "
                           "(pip install 'hybrid_fc[triton]'); use backend='auto' or 'torch' "
                           "to run without it")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpret_mode():
        return "triton"
    raise RuntimeError(f"backend='triton' runs on CUDA tensors (or on CPU tensors under "
                       f"TRITON_INTERPRET=1, for tests); these are on {device.type}. Use "
                       f"backend='auto' or 'torch' here")


def load_triton_ce(device: torch.device):
    """The triton kernel module, checked against the mode it was built in: kernels decorated
    for the GPU cannot take CPU tensors, interpreted ones are not meant for CUDA ones."""
    from . import triton_ce
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and not triton_ce.INTERPRETED:
        raise RuntimeError("backend='triton' on CPU tensors: hybrid_fc.head.kernels.triton_ce was "
                           "imported without TRITON_INTERPRET=1, so its kernels are compiled "
                           "for a GPU; set TRITON_INTERPRET=1 before it is first imported")
    if not on_cpu and triton_ce.INTERPRETED:
        raise RuntimeError("backend='triton' on CUDA tensors: hybrid_fc.head.kernels.triton_ce was "
                           "imported under TRITON_INTERPRET=1 (the CPU interpreter, for tests); "
                           "unset it to run the compiled kernels")
    return triton_ce
