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
            raise BackendUnavailableError(f"--attention-backend {name} is not implemented in this edgelm build") from exc
        raise
    return getattr(module, cls_name)


def check_backend(name: str, device: str) -> None:
    """Refuse at start-up a backend this machine cannot run, with the reason and the fallback."""
    cls = _backend_class(name)
    reason = cls.unavailable_reason(device) if hasattr(cls, "unavailable_reason") else None
    if reason:
        raise BackendUnavailableError(f"--attention-backend {name}: {reason}")


def backend_candidates(device: str) -> tuple[str, ...]:
    """Backends in order of preference for a device (unset --attention-backend takes the first that
    runs). On CUDA triton first: it decoded 5-14% faster than FlashInfer on the H100 with the same
    prefill speed (benchmarks/results/attention_backends_*), and it needs no kernel build at start-up
    (FlashInfer's JIT takes minutes, longer on a Jetson); flashinfer where triton cannot run."""
    return ("triton", "flashinfer", "torch_native") if str(device).startswith("cuda") else ("torch_native",)


def pick_backend(requested: str | None, device: str) -> str:
    if requested:
        check_backend(requested, device)
        return requested
    skipped = []
    for name in backend_candidates(device):
        try:
            check_backend(name, device)
        except BackendUnavailableError as exc:
            skipped.append(f"{name}: {str(exc).removeprefix(f'--attention-backend {name}: ')}")
            continue
        logger.info("attention backend: %s (the first that runs on %s%s)", name, device,
                    "; not " + "; not ".join(skipped) if skipped else "")
        return name
    return "torch_native"


def create_attention_backend(name: str, model_runner):
    return _backend_class(name)(model_runner)


def start_attention_backend(name: str, model_runner, auto: bool):
    """(name, backend) of the backend that starts. A backend may still refuse while starting
    (FlashInfer builds its kernels then): asked for by name, that stops the start with its
    reason; chosen automatically, the next candidate that runs takes its place, with a warning."""
    try:
        return name, create_attention_backend(name, model_runner)
    except Exception as exc:  # noqa: BLE001 - reported below, or re-raised
        if not auto:
            if isinstance(exc, BackendUnavailableError):
                raise
            raise BackendUnavailableError(f"--attention-backend {name} failed to start: {exc}") from exc
        device = model_runner.device
        rest = backend_candidates(device)
        for alt in rest[rest.index(name) + 1:] if name in rest else ():
            try:
                check_backend(alt, device)
            except BackendUnavailableError:
                continue
            logger.warning("attention backend %s did not start (%s); using %s", name, exc, alt)
            return alt, create_attention_backend(alt, model_runner)
        raise
