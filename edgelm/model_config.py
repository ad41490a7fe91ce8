"""The model's shape and numerics, read from an HF config (or a GGUF file's metadata)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from edgelm.model_loader.resolve import ResolvedModel

logger = logging.getLogger(__name__)

_DTYPES = {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32,
           "float32": torch.float32}


def resolve_dtype(dtype: str, hf_config, device: str) -> torch.dtype:
    if dtype != "auto":
        chosen = _DTYPES[dtype]
    elif device == "cpu":
        chosen = torch.float32
    else:
        cfg = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(cfg, str):
            cfg = _DTYPES.get(cfg, torch.bfloat16)
        chosen = cfg if cfg in (torch.float16, torch.bfloat16) else torch.bfloat16
    if chosen == torch.bfloat16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU has no bfloat16: using float16")
        chosen = torch.float16
    return chosen


@dataclass
class ModelConfig:
    source: ResolvedModel
    hf_config: object
    dtype: torch.dtype
    context_len: int
    architecture: str
    eos_token_ids: set[int] = field(default_factory=set)

    @classmethod
    def load(cls, source: ResolvedModel, dtype: str, device: str, context_length: int | None,
             trust_remote_code: bool = False) -> ModelConfig:
        from transformers import AutoConfig

        if source.gguf_file:
            hf_config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
        else:
            hf_config = AutoConfig.from_pretrained(source.directory, trust_remote_code=trust_remote_code)
        architectures = getattr(hf_config, "architectures", None)
        if not architectures:  # GGUF configs carry only model_type
            architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
                                  hf_config.model_type, hf_config.model_type)]
            hf_config.architectures = architectures
        model_max = int(getattr(hf_config, "max_position_embeddings", 4096))
        if context_length is not None and context_length > model_max:
            raise ValueError(f"--context-length {context_length} is beyond the model's {model_max} positions "
                             f"(max_position_embeddings); use at most {model_max}")
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        gen_path = os.path.join(source.directory, "generation_config.json")
        if not source.gguf_file and os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return cls(
            source=source,
            hf_config=hf_config,
            dtype=resolve_dtype(dtype, hf_config, device),
            context_len=context_length or model_max,
            architecture=architectures[0],
            eos_token_ids=eos_ids,
        )

    # shape shortcuts
    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hf_config.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size
