"""The Llama family: Llama 2/3/3.1/3.2, Mistral, SmolLM2, DeepSeek-R1-Distill-Llama.

Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on each head of q and k) are the same network with
those switches on; their files only set them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from edgelm.layers import triton_ops
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

    def forward(self, x: torch.Tensor, norm_in=None) -> torch.Tensor:
        """norm_in (int4_cuda.NormIn, batch 1): x is the layer's input before the post-attention RMSNorm, which
        gate_up_proj's kernel makes while it stages x."""
        # an int4 gate_up_proj whose batch-1 kernel makes the SiLU·mul in its epilogue (one launch fewer)
        glu = getattr(self.gate_up_proj, "forward_glu", None)
        h = glu(x, norm_in) if glu is not None and x.shape[0] == 1 else None
        if h is not None:
            return self.down_proj(h)
        gate_up = self.gate_up_proj(x) if norm_in is None else self.gate_up_proj.forward_norm(x, norm_in)
        # an int4 down_proj whose batch-1 kernel makes the SiLU·mul itself takes gate ‖ up (one launch fewer)
        take = getattr(self.down_proj, "forward_silu", None)
        y = take(gate_up) if take is not None and gate_up.shape[0] == 1 else None
        return self.down_proj(self.act_fn(gate_up)) if y is None else y


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

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch, norm_in=None) -> torch.Tensor:
        """norm_in (int4_cuda.NormIn, batch 1): hidden is the layer's input before its RMSNorm, which qkv_proj's
        kernel (cuda_w4) makes while it stages x."""
        if hidden.shape[0] == 1 and self.q_norm is None and triton_ops.enabled("int4_rope") and _int4_kernels_run(hidden):
            config, kernel = (None, "") if norm_in is not None else (_int4_fused_config(self.qkv_proj, hidden.device),
                                                                     "gemv_h2")
            if config is None and triton_ops.enabled("int4_rope_cuda"):  # the CUDA GEMV's same epilogue
                config, kernel = _int4_cuda_config(self.qkv_proj, hidden), "cuda_w4"
            out = None if config is None else self.attend_stored(positions, hidden, forward_batch, config,
                                                                 kernel=kernel, norm_in=norm_in)
            if out is not None:
                return self.o_proj(out)
        qkv = self.qkv_proj(hidden) if norm_in is None else self.qkv_proj.forward_norm(hidden, norm_in)
        return self.o_proj(self.attend(positions, qkv, forward_batch))

    def attend_stored(self, positions, x, forward_batch, config, norm=None, kernel="gemv_h2",
                      norm_in=None) -> torch.Tensor | None:
        """Batch-1 decode with an int4 qkv_proj whose GEMV applies the rotary to q and k and writes
        k and v into the KV pool itself (int4_fused.gemv_h2_fused; norm: (weight, eps) of an RMSNorm
        applied to x first; kernel "cuda_w4": int4_cuda.gemv_w4_rope, its norm given as norm_in): the attention output, or
        None (nothing done) where the attention backend or the kernel does not take that
        (AttentionBackend.fused_kv_target)."""
        from edgelm.quantization.int4_fused import RopeStore, gemv_h2_fused

        backend = forward_batch.attn_backend
        target = backend.fused_kv_target(self.attn, forward_batch)
        if target is None:
            return None
        rope = RopeStore(positions, self.rotary_emb.cos_sin_cache, self.head_dim, self.q_size, self.kv_size, *target)
        if kernel == "cuda_w4":
            from edgelm.quantization.int4_cuda import gemv_w4_rope

            q = gemv_w4_rope(x, self.qkv_proj.packed, self.qkv_proj.bias, config, rope, norm=norm_in)
            if q is None:
                return None
        else:
            q = gemv_h2_fused(x, self.qkv_proj.packed, self.qkv_proj.bias, config, norm=norm, rope=rope)
        return backend.forward_decode_stored(q, self.attn, forward_batch, target[0], target[1])

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, forward_batch) -> torch.Tensor:
        """Attention output [tokens, heads * head_dim] (before o_proj) of the projected q ‖ k ‖ v."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        # the rotary goes with q, k and v to the backend: the Triton backend fuses it with its KV write
        return self.attn(q, k, v, forward_batch, rope=(positions, self.rotary_emb))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, qkv_bias, qk_norm, rotary)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, forward_batch):
        norm_in = None
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            norm_in = _norm_into(self.input_layernorm, self.self_attn.qkv_proj, hidden, residual)
            if norm_in is None:
                hidden, residual = self.input_layernorm(hidden, residual)
            else:  # qkv_proj's kernel adds the residual and normalises while it stages x
                residual = norm_in.res_out
        hidden = self.self_attn(positions, hidden, forward_batch, norm_in)
        norm_in = _norm_into(self.post_attention_layernorm, self.mlp.gate_up_proj, hidden, residual)
        if norm_in is None:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
        else:
            residual = norm_in.res_out
        return self.mlp(hidden, norm_in), residual

    def forward_fused(self, positions, normed, residual, ss, forward_batch, plan: FusedPlan) -> torch.Tensor:
        """The layer with its norms, SiLU·mul and residual adds inside the GEMVs (batch-1 decode).

        residual [rows, hidden] is updated in place. Dense weights (triton_ops.gemv): the input norm
        comes either done (`normed`, first layer) or as `ss`, the sums of squares the previous layer's
        down_proj left; returns this layer's `ss` for the next. int4 weights (plan.int4, one row;
        int4_fused.gemv_h2_fused): every GEMV normalises its own input; SiLU·mul is gate_up's epilogue."""
        attn, mlp = self.self_attn, self.mlp
        if plan.int4:
            from edgelm.quantization.int4_fused import gemv_h2_fused as fused

            norm = (self.input_layernorm.weight, self.input_layernorm.eps)
            # qkv_proj's epilogue rotates q and k and writes k and v to the pool where the backend takes it
            out = attn.attend_stored(positions, residual, forward_batch, plan.qkv, norm=norm) if plan.rope else None
            if out is None:
                qkv = fused(residual, attn.qkv_proj.packed, attn.qkv_proj.bias, plan.qkv, norm=norm)
                out = attn.attend(positions, qkv, forward_batch)
            fused(out, attn.o_proj.packed, attn.o_proj.bias, plan.o, out=residual)
            norm = self.post_attention_layernorm
            act = fused(residual, mlp.gate_up_proj.packed, mlp.gate_up_proj.bias, plan.gate_up,
                        norm=(norm.weight, norm.eps), silu_pairs=True)
            fused(act, mlp.down_proj.packed, mlp.down_proj.bias, plan.down, out=residual)
            return None
        from edgelm.layers.triton_ops import gemv

        if ss is None:
            qkv = attn.qkv_proj(normed)
        else:
            norm = self.input_layernorm
            qkv = gemv.gemm_rmsnorm(residual, ss, norm.weight, norm.eps, attn.qkv_proj.weight, attn.qkv_proj.bias,
                                    plan.qkv)
        out = attn.attend(positions, qkv, forward_batch)
        ss = gemv.gemm_add_residual(out, attn.o_proj.weight, attn.o_proj.bias, residual, plan.o)
        norm = self.post_attention_layernorm
        gate_up = gemv.gemm_rmsnorm(residual, ss, norm.weight, norm.eps, mlp.gate_up_proj.weight,
                                    mlp.gate_up_proj.bias, plan.gate_up)
        return gemv.gemm_silu_add_residual(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, residual, plan.down)


class FusedPlan(NamedTuple):
    """GEMV configs of a decoder layer's four linears for one row count (triton_ops.gemv's, or
    int4 gemv_h2's where int4)."""
    qkv: object
    o: object
    gate_up: object
    down: object
    int4: bool = False
    rope: bool = False  # int4: qkv_proj's epilogue may take the rotary and the KV write (no q/k norm)


def fused_plan(layer: LlamaDecoderLayer, hidden: torch.Tensor) -> FusedPlan | None:
    """The fused decode path's configs, or None where it does not apply: a CPU tensor, the switch
    off ("fused_decode" for dense weights, "fused_int4" for int4), mixed or non-half weights, or a
    linear whose kernel at this row count has no fused form (cuBLAS; int4: not gemv_h2 without split K).
    With EDGELM_INT4_CPU=triton (tests, under TRITON_INTERPRET) the int4 plan applies to CPU tensors too."""
    if not (hidden.dim() == 2 and hidden.dtype in (torch.bfloat16, torch.float16)):
        return None
    linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    if triton_ops.enabled("fused_int4") and hidden.shape[0] == 1 and _int4_kernels_run(hidden):
        plan = _int4_plan(linears, hidden.device)
        if plan is not None:
            return plan._replace(rope=layer.self_attn.q_norm is None and layer.self_attn.head_dim % 2 == 0)
    if not (hidden.is_cuda and triton_ops.enabled("fused_decode")):
        return None
    from edgelm.layers.triton_ops import gemv

    if any(type(getattr(lin, "weight", None)) is not nn.Parameter or lin.weight.dtype != hidden.dtype
           for lin in linears):  # int4 layers have no dense weight
        return None
    configs = [gemv.config_for(hidden.shape[0], hidden.device, lin.weight) for lin in linears]
    return None if None in configs else FusedPlan(*configs)


def _int4_kernels_run(hidden: torch.Tensor) -> bool:
    """Whether edgelm's int4 Triton kernels run on hidden's device: CUDA, or the CPU with
    EDGELM_INT4_CPU=triton (tests, under TRITON_INTERPRET)."""
    return hidden.is_cuda or os.environ.get("EDGELM_INT4_CPU") == "triton"


def _int4_plan(linears, device: torch.device) -> FusedPlan | None:
    """One-row configs of four int4 linears on `device` that int4_fused.gemv_h2_fused runs, or None."""
    configs = [_int4_fused_config(lin, device) for lin in linears]
    return None if None in configs else FusedPlan(*configs, int4=True)


def _int4_fused_config(lin, device: torch.device):
    """The one-row gemv_h2 config of an int4 linear on `device` that int4_fused.gemv_h2_fused runs, or None."""
    from edgelm.quantization.int4_fused import fusable
    from edgelm.quantization.int4_kernels import choose_kernel
    from edgelm.quantization.int4_linear import Int4Linear

    if not (isinstance(lin, Int4Linear) and lin.qweight.device == device and lin.input_perm is None
            and lin.dense_weight is None and lin.cpu_weight is None):
        return None
    choice = choose_kernel(1, lin.packed)
    return choice[1] if choice is not None and choice[0] == "gemv_h2" and fusable(lin.packed, choice[1]) else None


def _norm_into(norm: RMSNorm, lin, hidden: torch.Tensor, residual: torch.Tensor):
    """An int4_cuda.NormIn for the linear after `norm` where its batch-1 kernel takes the norm (cuda_w4 with NORM
    in its config, int4_cuda.takes_norm): the residual add and the RMSNorm then happen inside it; else None."""
    if hidden.shape[0] != 1:
        return None
    from edgelm.quantization.int4_cuda import NormIn, norm_runs, takes_norm

    if not takes_norm(_int4_cuda_config(lin, hidden)):
        return None
    norm_in = NormIn(norm.weight, norm.eps, residual, torch.empty_like(residual))
    # where cuda_w4 cannot run it (a torch without NVRTC, ...), the RMSNorm kernel as usual
    return norm_in if norm_runs(hidden, lin.packed, norm_in) else None


def _int4_cuda_config(lin, hidden: torch.Tensor):
    """The batch-1 cuda_w4 config of an int4 linear (on hidden's CUDA device), or None where another kernel runs it."""
    from edgelm.quantization.int4_linear import Int4Linear

    return lin.cuda_w4_config(hidden) if isinstance(lin, Int4Linear) else None


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
        self._fused_plans: dict = {}

    def forward(self, input_ids, positions, forward_batch):
        hidden, residual = self.embed_tokens(input_ids), None
        key = (hidden.shape[0], hidden.device, hidden.dtype, triton_ops.enabled("fused_decode"),
               triton_ops.enabled("fused_int4"))
        if key not in self._fused_plans:  # the same for every step of this batch size
            self._fused_plans[key] = fused_plan(self.layers[0], hidden) if len(self.layers) else None
        plan = self._fused_plans[key]
        if plan is not None:
            return self._forward_fused(hidden, positions, forward_batch, plan)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, forward_batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _forward_fused(self, hidden, positions, forward_batch, plan: FusedPlan) -> torch.Tensor:
        residual, ss = hidden, None  # the embedding output becomes the residual stream, updated in place
        normed = None if plan.int4 else self.layers[0].input_layernorm(hidden)
        for layer in self.layers:
            ss = layer.forward_fused(positions, normed, residual, ss, forward_batch, plan)
        return self.norm(residual)


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
        # --quantize-lm-head: an int8_head.Int8Head set after loading replaces the 16-bit head
        self.head_quant = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The 16-bit head (the embedding table where tied); gone once --quantize-lm-head replaced it (head_quant)."""
        if self.head_quant is not None:
            raise RuntimeError("the LM head is quantized (head_quant): no 16-bit weight")
        return (self.model.embed_tokens if self.lm_head is None else self.lm_head).weight

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch) -> torch.Tensor:
        hidden = self.model(input_ids, positions, forward_batch)
        head = self.lm_head_weight if self.head_quant is None else self.head_quant
        return self.logits_processor(hidden, head, forward_batch)

    def _route(self, name: str) -> tuple[str, str | None]:
        """Our parameter's name for a checkpoint tensor's name (q_proj → qkv_proj, ...), and its shard."""
        for ckpt_piece, (our_piece, shard) in self.packed_modules_mapping.items():
            if f".{ckpt_piece}." in name:
                return name.replace(f".{ckpt_piece}.", f".{our_piece}."), shard
        return name, None

    def param_name(self, name: str) -> str:
        return self._route(name)[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # parameters, and the buffers a loader fills (the int4 layers of pre-quantized checkpoints)
        params = {name: buf for name, buf in self.named_buffers() if hasattr(buf, "weight_loader")}
        params.update(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            target, shard = self._route(name)
            if name.endswith(".bias") and target not in params and not tensor.any():
                continue  # AutoGPTQ saves a zero bias for every quantized linear, biased or not
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            if shard is None:
                param.weight_loader(param, tensor)
                loaded.add(target)
            else:
                param.weight_loader(param, tensor, shard)
                loaded.add(f"{target}:{shard}")
        missing = [n for n in params if n not in loaded and not any(k.startswith(n + ":") for k in loaded)]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")


class MistralForCausalLM(LlamaForCausalLM):
    pass


EntryClass = [LlamaForCausalLM, MistralForCausalLM]
