"""ModelRunner: owns the model, the KV pools, the attention backend and the sampler, and runs
one forward pass per ForwardBatch."""

from __future__ import annotations

import logging

import torch

from edgelm.layers.attention import create_attention_backend, pick_backend
from edgelm.layers.sampler import Sampler, SampleOutput
from edgelm.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator
from edgelm.model_config import ModelConfig
from edgelm.model_executor.forward_batch import ForwardBatch
from edgelm.model_executor.memory_planner import device_memory, plan_kv_pool
from edgelm.model_loader.loader import load_model
from edgelm.sampling.sampling_batch_info import SamplingBatchInfo
from edgelm.server_args import ServerArgs

logger = logging.getLogger(__name__)


def module_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class ModelRunner:
    def __init__(self, server_args: ServerArgs, model_config: ModelConfig, device: str):
        self.server_args = server_args
        self.model_config = model_config
        self.device = device
        self.dtype = model_config.dtype
        self.attention_backend_name = pick_backend(server_args.attention_backend, device)
        if device == "cuda":
            torch.cuda.set_device(0)
        available_before, total = device_memory(device)
        self.model = load_model(model_config, device, server_args.load_format)
        self.weight_bytes = module_bytes(self.model)
        available_after = device_memory(device)[0] if device == "cuda" else available_before - self.weight_bytes
        kv_per_token = MHATokenToKVPool.bytes_per_token(self.dtype, model_config.num_kv_heads,
                                                        model_config.head_dim, model_config.num_layers)
        self.memory_plan = plan_kv_pool(device, total if device == "cuda" else available_before, available_after,
                                        self.weight_bytes, kv_per_token, server_args.mem_fraction_static,
                                        server_args.max_total_tokens, model_config.context_len)
        self.max_total_tokens = self.memory_plan.max_total_tokens
        default_running = 512 if device == "cuda" else 128
        self.max_running_requests = min(server_args.max_running_requests or default_running,
                                         self.max_total_tokens)
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests, model_config.context_len + 8, device)
        self.token_to_kv_pool = MHATokenToKVPool(self.max_total_tokens, self.dtype, model_config.num_kv_heads,
                                                 model_config.head_dim, model_config.num_layers, device)
        self.allocator = TokenToKVPoolAllocator(self.max_total_tokens, device)
        self.attn_backend = create_attention_backend(self.attention_backend_name, self)
        self.sampler = Sampler()

    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Logits [batch, vocab] (or [num_tokens, vocab] with return_all_logits), float32."""
        forward_batch.req_to_token_pool = self.req_to_token_pool
        forward_batch.token_to_kv_pool = self.token_to_kv_pool
        forward_batch.attn_backend = self.attn_backend
        self.attn_backend.init_forward_metadata(forward_batch)
        return self.model(forward_batch.input_ids, forward_batch.positions, forward_batch)

    def sample(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SampleOutput:
        return self.sampler(logits, info)
