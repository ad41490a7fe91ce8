"""Model classes keyed by the HF `architectures` name."""

from __future__ import annotations

import importlib

_MODULES = ("llama", "qwen2", "qwen3")


def _build() -> dict[str, type]:
    registry = {}
    for name in _MODULES:
        module = importlib.import_module(f"edgelm.models.{name}")
        for cls in module.EntryClass:
            registry[cls.__name__] = cls
    return registry


MODEL_REGISTRY = _build()


def resolve_model_class(architectures: list[str] | None) -> type:
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"model architecture {architectures} is not supported; edgelm serves "
                     f"{sorted(MODEL_REGISTRY)}")
