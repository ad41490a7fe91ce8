"""The Llama family: Llama 2/3/3.1/3.2, Mistral, SmolLM2, DeepSeek-R1-Distill-Llama.

Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on each head of q and k) are the same network with
those switches on; their files only set them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from edgelm.layers.activation import SiluAndMul
from edgelm.layers.attention.radix_attention import RadixAttention
from edgelm.layers.layernorm import RMSNorm
from edgelm.layers.linear import Linear, MergedLinear
from edgelm.layers.rotary import RotaryEmbedding, rope_config
from edgelm.layers.vocab_embedding import LogitsProcessor, VocabEmbedding


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size},
                                         bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_id: int, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
                                     bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=getattr(config, "o_proj_bias", False))
        self.rotary_emb = rotary
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.attn = RadixAttention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, layer_id)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, forward_batch))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, qkv_bias, qk_norm, rotary)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, forward_batch):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, forward_batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base, scaling = rope_config(config)
        # one rotary table shared by every layer
        rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, base, scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias, qk_norm, rotary) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, forward_batch):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, forward_batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qkv_bias: bool | None = None  # None: from config.attention_bias
    qk_norm = False
    # checkpoint name piece → (our parameter's name piece, shard)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config):
        super().__init__()
        self.config = config
        qkv_bias = self.qkv_bias if self.qkv_bias is not None else getattr(config, "attention_bias", False)
        self.model = LlamaModel(config, qkv_bias, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else VocabEmbedding(config.vocab_size, config.hidden_size)
        self.logits_processor = LogitsProcessor()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return (self.model.embed_tokens if self.lm_head is None else self.lm_head).weight

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch) -> torch.Tensor:
        hidden = self.model(input_ids, positions, forward_batch)
        return self.logits_processor(hidden, self.lm_head_weight, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            for ckpt_piece, (our_piece, shard) in self.packed_modules_mapping.items():
                if f".{ckpt_piece}." in name:
                    target = name.replace(f".{ckpt_piece}.", f".{our_piece}.")
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    loaded.add(f"{target}:{shard}")
                    break
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                param = params[name]
                param.weight_loader(param, tensor)
                loaded.add(name)
        missing = [n for n in params if n not in loaded and not any(k.startswith(n + ":") for k in loaded)]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")


class MistralForCausalLM(LlamaForCausalLM):
    pass


EntryClass = [LlamaForCausalLM, MistralForCausalLM]
