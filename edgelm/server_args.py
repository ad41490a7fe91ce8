"""Every server flag, declared once: its name, default, help text and check.

Names and meanings follow SGLang's `launch_server`, so a command line written for SGLang on a
Jetson runs unchanged with `edgelm` in place of `sglang`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("torch_native", "triton", "flashinfer")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
TORCHAO_CONFIGS = (
    "int4wo-32", "int4wo-64", "int4wo-128", "int4wo-256", "int8wo", "int8dq",
    "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row",
)


class ServerArgsError(ValueError):
    """A flag value that edgelm refuses at start-up; the message says why and what to do."""


def _flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = _flag(
        None, "HF hub id, local HF directory or .gguf file. Unset: the embedded SmolLM2-135M-Instruct.")
    tokenizer_path: str | None = _flag(None, "Tokenizer directory or hub id (default: the model's).")
    load_format: str = _flag("auto", "How to read weights; 'dummy' makes random weights from the config.",
                             choices=LOAD_FORMATS)
    trust_remote_code: bool = _flag(False, "Allow custom code in HF configs and tokenizers.")
    revision: str | None = _flag(None, "Hub revision (branch, tag or commit) to download.")
    served_model_name: str | None = _flag(None, "Model name reported by /v1/models (default: the model path).")
    chat_template: str | None = _flag(None, "Jinja chat template file, or an inline template string.")
    context_length: int | None = _flag(None, "Maximum tokens of prompt + output (default: the model's).")
    # Device and numerics
    device: str = _flag("auto", "Where to run: auto picks cuda when a GPU is visible, else cpu.",
                        choices=("auto", "cuda", "cpu"))
    dtype: str = _flag("auto", "Weight and activation dtype. auto: the checkpoint's (bfloat16 if the GPU "
                       "lacks it: float16), float32 on CPU.", choices=DTYPES)
    kv_cache_dtype: str = _flag("auto", "KV cache dtype; auto follows --dtype.", choices=("auto",))
    attention_backend: str | None = _flag(
        None, "Attention kernels. Unset: the best one available on this device.", choices=ATTENTION_BACKENDS)
    torchao_config: str = _flag("", "TorchAO weight quantization, e.g. int4wo-128.",
                                choices=("",) + TORCHAO_CONFIGS)
    quantize_lm_head: str = _flag(
        "none", "int8: the LM head as int8 rows with a float32 scale each (half the bytes of a 16-bit head; "
        "the largest single read of an int4 decode step). Default none: the head keeps --dtype.",
        choices=("none", "int8"))
    quantization: str | None = _flag(
        None, "Pre-quantized 4-bit checkpoint format; detected from config.json (a GGUF: from its tensors) when "
        "unset.", choices=("awq", "gptq", "awq_marlin", "gptq_marlin", "gguf"))
    dequantize_gguf: bool = _flag(
        False, "Dequantize a GGUF's 4-bit linear weights (Q4_0, Q4_1, Q4_K) to --dtype at load instead of running "
        "them as stored on the int4 kernels.")
    random_seed: int | None = _flag(None, "Seed for requests that bring none (default: random).")
    # Memory and scheduling
    mem_fraction_static: float | None = _flag(
        None, "Fraction of device memory for weights + KV pool (default depends on the device).")
    max_running_requests: int | None = _flag(None, "Most requests decoding at once.")
    max_queued_requests: int | None = _flag(
        None, "Most requests waiting beyond --max-running-requests; more in flight get a 503 with Retry-After.")
    max_total_tokens: int | None = _flag(None, "KV pool size in tokens (default: from the memory plan).")
    chunked_prefill_size: int | None = _flag(
        None, "Most prompt tokens in one prefill step; -1 disables chunking.")
    max_prefill_tokens: int = _flag(16384, "Most prompt tokens admitted into one prefill batch.")
    schedule_policy: str = _flag("fcfs", "Order of the waiting queue: fcfs, or lpm (longest cached prefix "
                                 "first).", choices=("fcfs", "lpm"))
    disable_radix_cache: bool = _flag(False, "Do not reuse KV of shared prefixes across requests.")
    cuda_graph_max_bs: int | None = _flag(None, "Largest decode batch captured in a CUDA graph.")
    disable_cuda_graph: bool = _flag(False, "Run decode eagerly (no CUDA graphs).")
    disable_overlap_schedule: bool = _flag(
        False, "Process each decode step's results after its GPU work, not while the next step's forward runs "
        "(overlap is on by default on CUDA).")
    # Structured output and parsing
    grammar_backend: str | None = _flag(
        None, "Constrained decoding backend (default: xgrammar when installed, else none).",
        choices=("xgrammar", "none"))
    grammar_workers: int | None = _flag(
        None, "Processes that hold the grammar matchers, advancing them and filling their bitmask rows beside "
        "the scheduler (default on CUDA: a quarter of the CPU cores, at most 4; 0, and the default on a CPU "
        "device: in the scheduler process).")
    reasoning_parser: str | None = _flag(None, "Split <think> content into reasoning_content.",
                                         choices=("deepseek-r1", "qwen3"))
    tool_call_parser: str | None = _flag(None, "Parse tool calls from the model's output.",
                                         choices=("llama3", "qwen25", "mistral"))
    # HTTP server
    host: str = _flag("127.0.0.1", "Address to bind; 0.0.0.0 exposes the server to the network.")
    port: int = _flag(30000, "HTTP port.")
    api_key: str | None = _flag(None, "Require this Bearer key on every route but /health.")
    enable_metrics: bool = _flag(False, "Serve Prometheus metrics on /metrics.")
    request_timeout: float | None = _flag(
        None, "Seconds a request may take from arrival to its last token; beyond it it is aborted (a 504).")
    watchdog_timeout: float = _flag(
        300.0, "Seconds without a sign of life from the engine loop before the server reports unhealthy "
        "and exits non-zero (for a supervisor to restart it).")
    # Logging
    log_level: str = _flag("info", "Logging level.", choices=("debug", "info", "warning", "error"))
    log_requests: bool = _flag(False, "Log every request's inputs and outputs.")
    decode_log_interval: int = _flag(40, "Log one 'Decode batch' line every this many decode steps.")

    # ------------------------------------------------------------------ CLI
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(ServerArgs):
            name = "--" + f.name.replace("_", "-")
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            if f.type in ("bool", bool):
                parser.add_argument(name, action="store_true", help=help_text)
                continue
            typ = {"int | None": int, "int": int, "float | None": float, "float": float}.get(f.type, str)
            parser.add_argument(name, type=typ, default=f.default, help=help_text, **meta)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse values edgelm cannot honour, at start-up, with a message that says what to do."""
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ServerArgsError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        for name in ("context_length", "max_running_requests", "max_total_tokens", "max_queued_requests",
                     "cuda_graph_max_bs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ServerArgsError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size == 0:
            raise ServerArgsError("--chunked-prefill-size must be positive, or -1 to disable chunking")
        for name in ("request_timeout", "watchdog_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ServerArgsError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
        if not 0 < self.port < 65536:
            raise ServerArgsError(f"--port must be in 1..65535, got {self.port}")
        if self.decode_log_interval <= 0:
            raise ServerArgsError("--decode-log-interval must be positive")
        if self.grammar_workers is not None and self.grammar_workers < 0:
            raise ServerArgsError(f"--grammar-workers must be 0 or more, got {self.grammar_workers}")
        if self.quantization == "gguf" and self.dequantize_gguf:
            raise ServerArgsError("--quantization gguf runs a GGUF's 4-bit weights as stored; --dequantize-gguf "
                                  "asks for the opposite: pass one of them")
        if self.quantization is not None and self.torchao_config:
            raise ServerArgsError(f"--quantization {self.quantization} loads an already quantized checkpoint: "
                                  f"drop --torchao-config {self.torchao_config}")

    def resolved_overlap_schedule(self, device: str) -> bool:
        """On a CPU device the forward runs on the scheduler's thread: there is nothing to overlap.
        EDGELM_OVERLAP_SCHEDULE=1 forces it on anyway (tests run the overlapped path on the CPU)."""
        if self.disable_overlap_schedule:
            return False
        forced = os.environ.get("EDGELM_OVERLAP_SCHEDULE")
        if forced in ("0", "1"):
            return forced == "1"
        return device == "cuda"

    def resolved_grammar_workers(self, device: str) -> int:
        """On a CPU device the forward already uses every core and runs on the scheduler's thread:
        nothing to overlap with, so the matchers stay in-process."""
        if self.grammar_workers is not None:
            return self.grammar_workers
        if device != "cuda":
            return 0
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return min(4, cores // 4)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_server_args(argv: list[str] | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="edgelm.launch_server",
                                     description="Serve a model over the OpenAI API (SGLang's flags).")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    try:
        return ServerArgs.from_cli_args(args)
    except ServerArgsError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
