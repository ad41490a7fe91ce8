"""Attention backends, chosen by --attention-backend; the model never branches on which."""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

# name -> (module, class); a backend whose module is missing is not implemented in this build
_BACKENDS = {
    "torch_native": ("edgelm.layers.attention.torch_native_backend", "TorchNativeAttnBackend"),
    "triton": ("edgelm.layers.attention.triton_backend", "TritonAttnBackend"),
    "flashinfer": ("edgelm.layers.attention.flashinfer_backend", "FlashInferAttnBackend"),
}


class BackendUnavailableError(RuntimeError):
    pass


def _backend_class(name: str):
    module_name, cls_name = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BackendUnavailableError(
                f"--attention-backend {name} is not implemented in this edgelm build (the FlashInfer wrapper is "
                "not written yet, whether or not the flashinfer package is installed); use --attention-backend "
                "triton on a CUDA GPU, or torch_native") from exc
        raise
    return getattr(module, cls_name)


def check_backend(name: str, device: str) -> None:
    """Refuse at start-up a backend this machine cannot run, with the reason and the fallback."""
    cls = _backend_class(name)
    reason = cls.unavailable_reason(device) if hasattr(cls, "unavailable_reason") else None
    if reason:
        raise BackendUnavailableError(f"--attention-backend {name}: {reason}")


def pick_backend(requested: str | None, device: str) -> str:
    if requested:
        check_backend(requested, device)
        return requested
    candidates = ("flashinfer", "triton", "torch_native") if device == "cuda" else ("torch_native",)
    for name in candidates:
        try:
            check_backend(name, device)
        except BackendUnavailableError:
            continue
        logger.info("attention backend: %s (best available on %s)", name, device)
        return name
    return "torch_native"


def create_attention_backend(name: str, model_runner):
    return _backend_class(name)(model_runner)
