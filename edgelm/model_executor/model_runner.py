"""ModelRunner: owns the model, the KV pools, the attention backend, the CUDA graphs and the
sampler, and runs one forward pass per ForwardBatch."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time

import torch

from edgelm.layers.attention import create_attention_backend, pick_backend, start_attention_backend
from edgelm.layers.sampler import SampleOutput, Sampler
from edgelm.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator
from edgelm.model_config import ModelConfig
from edgelm.model_executor.forward_batch import ForwardBatch
from edgelm.model_executor.memory_planner import (
    GB,
    cuda_is_integrated,
    device_memory,
    estimate_activation_bytes,
    estimate_cuda_graph_bytes,
    plan_kv_pool,
    preflight_check,
)
from edgelm.model_executor.weight_bytes import estimate_weight_bytes, int4_cpu_extra
from edgelm.model_loader import gguf_int4
from edgelm.model_loader.loader import load_model
from edgelm.sampling.sampling_batch_info import SamplingBatchInfo
from edgelm.server_args import ServerArgs

logger = logging.getLogger(__name__)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds in memory; quantized tensor subclasses (torchao) are counted through
    their inner tensors, not their logical shape."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
    return t.numel() * t.element_size()


def module_bytes(module: torch.nn.Module, buffers: bool = True) -> int:
    seen, total = set(), 0
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


_CPU_DEFAULT_MAX_TOKENS = 65536


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def _load_torchao():
    """(check, apply) from edgelm.quantization.torchao_config, imported only when asked for."""
    try:
        from edgelm.quantization.torchao_config import apply_torchao_config, check_torchao_config
    except ModuleNotFoundError as exc:
        if exc.name != "edgelm.quantization.torchao_config":
            raise
        raise RuntimeError("--torchao-config is not implemented in this edgelm build") from exc
    return check_torchao_config, apply_torchao_config


class ModelRunner:
    def __init__(self, server_args: ServerArgs, model_config: ModelConfig, device: str):
        self.server_args = server_args
        self.model_config = model_config
        self.device = device
        self.dtype = model_config.dtype
        self.attention_backend_name = pick_backend(server_args.attention_backend, device)
        if device == "cuda":
            torch.cuda.set_device(0)
        torchao_config = server_args.torchao_config or None
        self.prequant = None
        self.gguf_plan = None  # model_loader.gguf_int4.GGUFInt4Plan where a GGUF's 4-bit layers load as stored
        if not model_config.source.gguf_file:
            from edgelm.quantization.prequantized import legacy_quantization_config, prequant_config

            if server_args.quantization == "gguf":
                raise ValueError("--quantization gguf needs a .gguf --model-path")
            hf_config = model_config.hf_config
            if getattr(hf_config, "quantization_config", None) is None:
                # older checkpoints keep it in a file of its own: attached once, the memory estimates read it too
                legacy = legacy_quantization_config(model_config.source.directory)
                if legacy is not None:
                    hf_config.quantization_config = legacy
            self.prequant = prequant_config(hf_config, server_args.quantization)
        elif server_args.quantization not in (None, "gguf"):
            raise ValueError(f"--quantization {server_args.quantization} is for AWQ/GPTQ safetensors checkpoints, "
                             "not a GGUF file")
        elif not (torchao_config or server_args.dequantize_gguf):
            self.prequant = self._gguf_int4(model_config, device, server_args.quantization == "gguf")
        if self.prequant and torchao_config:
            raise ValueError(f"the checkpoint is already {self.prequant.method.upper()}-quantized: drop "
                             f"--torchao-config {torchao_config}")
        if self.prequant:
            from edgelm.quantization.prequantized import check_device

            check_device(self.prequant, device)
        if torchao_config:
            check_torchao, apply_torchao = _load_torchao()
            check_torchao(torchao_config, device)
        head_quant = server_args.quantize_lm_head
        if head_quant != "none":  # imported only when asked for (it loads triton)
            from edgelm.quantization.int8_head import check_lm_head_quant

            check_lm_head_quant(head_quant, device)
        available_before, total = device_memory(device)
        kv_per_token = MHATokenToKVPool.bytes_per_token(self.dtype, model_config.num_kv_heads,
                                                        model_config.head_dim, model_config.num_layers)
        default_running = 512 if device == "cuda" else 128
        graph_bytes, activation_bytes = self._reserve_estimates(server_args.max_running_requests or default_running)
        if server_args.load_format != "dummy" or device == "cuda":
            self._preflight(available_before, total, kv_per_token, graph_bytes, activation_bytes)
        start = time.perf_counter()
        int4_load = self.prequant
        if torchao_config and torchao_config.startswith("int4wo-"):
            # quantized tensor by tensor as the checkpoint is read: the dense model never exists at once
            # (an 8B model in int4 loads on a 16 GB Jetson)
            from edgelm.quantization.prequantized import quantize_on_load

            int4_load = quantize_on_load(int(torchao_config.split("-")[1]))
            if model_config.source.gguf_file and int4_load.group_size == gguf_int4.GROUP:
                # a GGUF at group 32: its 4-bit layers as stored, only the others quantized (a Q4_K_M file's Q6_K
                # v and down projections), so every linear layer is int4 and none of the file's is requantized
                plan = gguf_int4.plan(model_config.source.gguf_path)
                int4_load = dataclasses.replace(int4_load, stored_int4=plan.int4_modules)
                logger.info("--torchao-config %s on a GGUF: %d linear layers as stored (4-bit in the file), %d "
                            "quantized as they load", torchao_config, len(plan.int4_modules), len(plan.dense_modules))
        self.model = load_model(model_config, device, server_args.load_format, int4_load)
        if torchao_config and int4_load is None:
            apply_torchao(self.model, torchao_config, device)
        if head_quant != "none":
            from edgelm.quantization.int8_head import quantize_lm_head

            head = quantize_lm_head(self.model, head_quant)
            logger.info("LM head quantized to %s: %d × %d (%.0f MB)", head_quant, head.vocab_size, head.hidden_size,
                        (head.qweight.nbytes + head.scale.nbytes) / 1e6)
        logger.info("loaded weights (%s) in %.1f s", server_args.load_format, time.perf_counter() - start)
        if device == "cuda":
            torch.cuda.empty_cache()
            from edgelm.layers import triton_ops

            if triton_ops.enabled("l2_prefetch"):  # off by default (measured slower on the H100)
                from edgelm.layers.triton_ops.l2_prefetch import mark_l2_prefetch

                mark_l2_prefetch(self.model)
            if triton_ops.enabled("int4_meta_pairs"):  # off by default (measured slower on the H100)
                from edgelm.quantization.int4_linear import set_meta_pairs

                set_meta_pairs(self.model)
        self.weight_bytes = module_bytes(self.model)
        available_after = available_before - self.weight_bytes
        if device == "cuda":  # on shared memory (Jetson) the OS may not report the weights yet: take the lower
            available_after = min(device_memory(device)[0], available_after)
        max_total_tokens = server_args.max_total_tokens
        if device == "cpu" and max_total_tokens is None:
            # a CPU pool beyond this only costs start-up time and RAM: the CPU cannot decode that many at once
            max_total_tokens = min(_CPU_DEFAULT_MAX_TOKENS, max(4 * model_config.context_len, 16384))
        self.memory_plan = plan_kv_pool(device, total if device == "cuda" else available_before, available_after,
                                        self.weight_bytes, kv_per_token, server_args.mem_fraction_static,
                                        max_total_tokens, model_config.context_len,
                                        cuda_graph_bytes=graph_bytes, activation_bytes=activation_bytes,
                                        quantize=self._quantize_hint())
        for line in self.memory_plan.summary_lines():
            logger.info(line)
        self.max_total_tokens = self.memory_plan.max_total_tokens
        self.max_running_requests = min(server_args.max_running_requests or default_running,
                                         self.max_total_tokens)
        # rows a multiple of 16 long: aligned loads in the attention kernels
        row_len = _round_up(model_config.context_len + 8, 16)
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests, row_len, device)
        self.token_to_kv_pool = MHATokenToKVPool(self.max_total_tokens, self.dtype, model_config.num_kv_heads,
                                                 model_config.head_dim, model_config.num_layers, device)
        self.allocator = TokenToKVPoolAllocator(self.max_total_tokens, device)
        self.attention_backend_name, self.attn_backend = start_attention_backend(
            self.attention_backend_name, self, auto=server_args.attention_backend is None)
        self.sampler = Sampler()
        self.cuda_graph_runner = None
        self.graph_memory_bytes = 0
        self.init_cuda_graphs()
        logger.info(self.summary())

    def _gguf_int4(self, model_config: ModelConfig, device: str, asked: bool):
        """The PrequantConfig that loads a GGUF's 4-bit linear weights as stored (gguf_int4), or None: the file has
        none, or (unless `asked`, --quantization gguf, which then refuses) this GPU cannot run the int4 kernels."""
        from edgelm.quantization.prequantized import PrequantizedError, check_device, gguf_as_stored

        plan = gguf_int4.plan(model_config.source.gguf_path)
        if not plan.int4_modules:
            if asked:
                raise ValueError("--quantization gguf: this GGUF has no linear layer stored in Q4_0, Q4_1 or Q4_K")
            return None
        pcfg = gguf_as_stored(plan.int4_modules)
        try:
            check_device(pcfg, device)
        except PrequantizedError as e:
            if asked:
                raise
            logger.warning("GGUF: %s; its weights are dequantized to %s instead", e, str(self.dtype).replace("torch.", ""))
            return None
        self.gguf_plan = plan
        gguf_int4.log_plan(plan, self.dtype, requantize_hint=not self.server_args.torchao_config)
        return pcfg

    def _preflight(self, available: int, total: int, kv_per_token: int, graph_bytes: int,
                   activation_bytes: int) -> None:
        """Refuse a model that cannot fit before loading a byte of it, with the numbers."""
        cfg, args = self.model_config, self.server_args
        dtype = str(self.dtype).replace("torch.", "")
        head = args.quantize_lm_head  # "none" or "int8": the estimate prices the head as the runner will load it
        weights = estimate_weight_bytes(cfg.hf_config, dtype, args.torchao_config or "", self.device, head)
        if self.gguf_plan is not None:  # its 4-bit layers as loaded, not dequantized
            int4_bytes, dense_bytes = self.gguf_plan.loaded_bytes(self.dtype.itemsize)
            weights += int4_bytes - dense_bytes
            if self.device == "cpu":
                weights += int4_cpu_extra(self.gguf_plan.int4_weights // 2, dense_bytes)
        alternatives = {}  # named in a refusal where they fit, in this order (preferred first)
        hint = self._quantize_hint()
        if hint and self.device == "cuda":
            if hint == "int4wo-32":
                # a GGUF whose other linears (e.g. a Q4_K_M's Q6_K v / down) load dense: int4wo-32 keeps its 4-bit
                # layers as stored and quantizes only those, where int4wo-128 would requantize every layer
                alternatives["int4wo-32"] = weights - self.gguf_plan.requantize_saving(self.dtype.itemsize)
            alternatives["int4wo-128"] = estimate_weight_bytes(cfg.hf_config, dtype, "int4wo-128", self.device, head)
        preflight_check((available, total), weights, kv_per_token, min(cfg.context_len, 2048),
                        args.mem_fraction_static, device=self.device,
                        unified_memory=self.device == "cuda" and cuda_is_integrated(),
                        max_total_tokens=args.max_total_tokens, cuda_graph_bytes=graph_bytes,
                        activation_bytes=activation_bytes, alternatives=alternatives, quantize=hint)

    def _quantize_hint(self) -> str | None:
        """The --torchao-config a memory refusal suggests: none where the weights are quantized already
        (--torchao-config, an AWQ/GPTQ checkpoint); int4wo-32 for a GGUF with layers it loads dense (its 4-bit
        ones stay as stored); else int4wo-128."""
        if self.server_args.torchao_config or (self.prequant is not None and self.prequant.method != "gguf"):
            return None
        plan = self.gguf_plan
        return "int4wo-32" if plan is not None and plan.dense_weights else "int4wo-128"

    def _reserve_estimates(self, max_running: int) -> tuple[int, int]:
        """(CUDA graph, activation) bytes the memory plan leaves free besides the KV pool; on a GPU only."""
        if self.device != "cuda":
            return 0, 0
        from edgelm.model_executor.cuda_graph_runner import capture_batch_sizes, default_cuda_graph_max_bs

        cfg, args = self.model_config, self.server_args
        hf = cfg.hf_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        graph_bytes, max_bs, num_graphs = 0, 0, 0
        if not args.disable_cuda_graph:  # the backend may still turn graphs off: an over-estimate then
            max_bs = min(args.cuda_graph_max_bs or default_cuda_graph_max_bs(), max_running)
            num_graphs = len(capture_batch_sizes(max_bs))
            graph_bytes = estimate_cuda_graph_bytes(max_bs, num_graphs, hf.hidden_size,
                                                    hf.intermediate_size, cfg.vocab_size, elem)
        if self.attention_backend_name == "flashinfer":  # its workspaces and graph page tables
            from edgelm.layers.attention.flashinfer_backend import device_workspace_bytes

            graph_bytes += device_workspace_bytes(num_graphs, max_bs, cfg.context_len)
        chunk = args.chunked_prefill_size or 8192
        if chunk == -1:
            chunk = args.max_prefill_tokens
        activation_bytes = estimate_activation_bytes(hf.hidden_size, hf.intermediate_size, cfg.vocab_size,
                                                     cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                                                     chunk, max_running, elem)
        return graph_bytes, activation_bytes

    def set_attention_backend(self, name: str) -> None:
        """Swap the attention backend (and recapture the CUDA graphs) over the same weights and KV
        pool: benchmarks and tests compare backends on one loaded model this way."""
        from edgelm.layers.attention import check_backend

        check_backend(name, self.device)
        self.cuda_graph_runner, self.attn_backend, self.graph_memory_bytes = None, None, 0
        gc.collect()  # the old graphs and their memory pool go before the new ones are captured
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        self.attention_backend_name = name
        self.attn_backend = create_attention_backend(name, self)
        self.init_cuda_graphs()

    # ------------------------------------------------------------ CUDA graphs
    def cuda_graph_disabled_reason(self) -> str | None:
        if self.device != "cuda":
            return f"device is {self.device}"
        if self.server_args.disable_cuda_graph:
            return "--disable-cuda-graph"
        if not getattr(self.attn_backend, "supports_cuda_graph", False):
            return f"the {self.attention_backend_name} attention backend does not support them"
        return None

    def init_cuda_graphs(self) -> None:
        reason = self.cuda_graph_disabled_reason()
        if reason:
            logger.info("CUDA graphs off: %s; decode runs eagerly", reason)
            return
        from edgelm.model_executor.cuda_graph_runner import CudaGraphRunner, default_cuda_graph_max_bs

        max_bs = min(self.server_args.cuda_graph_max_bs or default_cuda_graph_max_bs(), self.max_running_requests)
        logger.info("capturing CUDA graphs for decode batches up to %d", max_bs)
        self.cuda_graph_runner = CudaGraphRunner(self, max_bs)
        self.graph_memory_bytes = self.cuda_graph_runner.memory_bytes

    def summary(self) -> str:
        """One start-up line: what runs where, and where the memory went."""
        cfg, plan = self.model_config, self.memory_plan
        device = self.device
        if device == "cuda":
            device = f"cuda ({torch.cuda.get_device_name()})"
        graphs = "off"
        if self.cuda_graph_runner is not None:
            g = self.cuda_graph_runner
            graphs = (f"bs 1..{g.max_bs} ({len(g.capture_bs)} graphs, {self.graph_memory_bytes / GB:.2f} GB, "
                      f"{g.capture_seconds:.1f} s)")
        quant = f", torchao {self.server_args.torchao_config}" if self.server_args.torchao_config else ""
        if self.prequant:
            quant = f", {self.prequant.method} int4 (group {self.prequant.group_size})"
        return (f"model {cfg.source.display_name} ({cfg.architecture}), dtype {str(self.dtype).replace('torch.', '')}"
                f"{quant}, device {device}, attention {self.attention_backend_name}, "
                f"weights {self.weight_bytes / GB:.2f} GB, KV pool {self.max_total_tokens} tokens "
                f"({plan.kv_bytes / GB:.2f} GB), max running requests {self.max_running_requests}, "
                f"context {cfg.context_len}, CUDA graphs {graphs}")

    # ------------------------------------------------------------ forward
    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Logits [batch, vocab] (or [num_tokens, vocab] with return_all_logits), float32."""
        forward_batch.req_to_token_pool = self.req_to_token_pool
        forward_batch.token_to_kv_pool = self.token_to_kv_pool
        forward_batch.attn_backend = self.attn_backend
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(forward_batch):
            return self.cuda_graph_runner.replay(forward_batch)  # records the decode slots itself
        if forward_batch.forward_mode.is_decode():
            forward_batch.materialize(self.device)
            self.record_decode_slots(forward_batch)
        self.attn_backend.init_forward_metadata(forward_batch)
        return self.model(forward_batch.input_ids, forward_batch.positions, forward_batch)

    def record_decode_slots(self, forward_batch: ForwardBatch) -> None:
        """req_to_token[request, position] = the KV slot of each decode token (idempotent)."""
        table = self.req_to_token_pool.req_to_token
        table[forward_batch.req_pool_indices, forward_batch.positions] = forward_batch.out_cache_loc.to(table.dtype)

    def sample(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SampleOutput:
        return self.sampler(logits, info)
