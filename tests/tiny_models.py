"""Tiny random HF checkpoints and a minimal driver of edgelm's ModelRunner, shared by the tests
that compare edgelm with transformers (no scheduler: requests are laid out in the pools by hand)."""

from __future__ import annotations

import torch

from edgelm.model_config import ModelConfig
from edgelm.model_executor.forward_batch import ForwardBatch
from edgelm.model_executor.model_runner import ModelRunner
from edgelm.model_loader.resolve import resolve_model
from edgelm.server_args import ServerArgs

_COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_config(family: str):
    """An HF config for `family`: llama3 (llama3 rope scaling, tied embeddings), llama (untied,
    MHA), qwen2 (q/k/v bias), qwen3 (per-head q/k RMSNorm, head_dim != hidden / heads)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if family == "llama3":
        return LlamaConfig(**_COMMON, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "llama":
        return LlamaConfig(**{**_COMMON, "num_key_value_heads": 4}, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**_COMMON, tie_word_embeddings=False)
    if family == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=24, tie_word_embeddings=True, attention_bias=False)
    raise ValueError(family)


def make_checkpoint(family: str, directory, seed: int = 0):
    """Save a random tiny model of `family` as safetensors into `directory`; return the HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


def make_runner(model_path: str | None, max_total_tokens: int = 2048, **overrides) -> ModelRunner:
    args = ServerArgs(model_path=model_path, device="cpu", max_total_tokens=max_total_tokens,
                      max_running_requests=32, **overrides)
    config = ModelConfig.load(resolve_model(args.model_path), args.dtype, "cpu", args.context_length)
    return ModelRunner(args, config, "cpu")


class Driver:
    """Lays requests out in the runner's pools and runs extend / decode passes on them."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.req_slots: list[int] = []
        self.seq_lens: list[int] = []

    def add_requests(self, n: int) -> list[int]:
        new = [self.runner.req_to_token_pool.alloc() for _ in range(n)]
        self.req_slots += new
        self.seq_lens += [0] * n
        return list(range(len(self.req_slots) - n, len(self.req_slots)))

    def release(self) -> None:
        """Give every request slot back (KV slots stay allocated: the pool is large enough for tests)."""
        for slot in self.req_slots:
            self.runner.req_to_token_pool.free(slot)
        self.req_slots, self.seq_lens = [], []

    def attach_prefix(self, r: int, kv_slots: torch.Tensor) -> None:
        """Start request `r` on cached KV (e.g. a radix-cache match): its first tokens are computed."""
        self.runner.req_to_token_pool.write(self.req_slots[r], 0, kv_slots)
        self.seq_lens[r] = len(kv_slots)

    def kv_slots(self, r: int) -> torch.Tensor:
        return self.runner.req_to_token_pool.req_to_token[self.req_slots[r], :self.seq_lens[r]].to(torch.int64)

    def extend(self, reqs: list[int], chunks: list[list[int]], return_all_logits: bool = False) -> torch.Tensor:
        """Append `chunks[i]` to request `reqs[i]` in one extend pass (prefix = what it has)."""
        total = sum(len(c) for c in chunks)
        slots = self.runner.allocator.alloc(total)
        assert slots is not None, "KV pool full"
        prefix_lens, off = [], 0
        for r, c in zip(reqs, chunks):
            self.runner.req_to_token_pool.write(self.req_slots[r], self.seq_lens[r], slots[off:off + len(c)])
            prefix_lens.append(self.seq_lens[r])
            self.seq_lens[r] += len(c)
            off += len(c)
        batch = ForwardBatch.for_extend([t for c in chunks for t in c], [self.req_slots[r] for r in reqs],
                                        prefix_lens, [len(c) for c in chunks], slots, "cpu",
                                        return_all_logits=return_all_logits)
        return self.runner.forward(batch)

    def decode(self, reqs: list[int], tokens: list[int]) -> torch.Tensor:
        slots = self.runner.allocator.alloc(len(reqs))
        assert slots is not None, "KV pool full"
        for r in reqs:
            self.seq_lens[r] += 1
        # as the scheduler does: host lists, and the runner records the new slots in req_to_token
        batch = ForwardBatch.for_decode(tokens, [self.req_slots[r] for r in reqs],
                                        [self.seq_lens[r] for r in reqs], slots, "cpu", lazy=True)
        return self.runner.forward(batch)

    def greedy(self, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Prefill `prompts` in one batch, then `steps` - 1 batched decode passes. Returns each
        request's greedy tokens and the logits [batch, vocab] of every step."""
        reqs = self.add_requests(len(prompts))
        logits = self.extend(reqs, prompts)
        all_logits, out = [logits], [[] for _ in prompts]
        for _ in range(steps - 1):
            nxt = logits.argmax(-1).tolist()
            for o, t in zip(out, nxt):
                o.append(t)
            logits = self.decode(reqs, nxt)
            all_logits.append(logits)
        for o, t in zip(out, logits.argmax(-1).tolist()):
            o.append(t)
        return out, all_logits


def int4_cpu_runner(directory, monkeypatch, family: str = "qwen2") -> ModelRunner:
    """A tiny int4wo-128 fp16 model whose int4 layers run edgelm's Triton kernels (their plain-op path under
    the interpreter) on the CPU (EDGELM_INT4_CPU=triton)."""
    from edgelm.quantization import torchao_config as tc

    monkeypatch.setenv("EDGELM_INT4_CPU", "triton")
    make_checkpoint(family, directory)
    runner = make_runner(str(directory), dtype="float16")
    tc.apply_torchao_config(runner.model, "int4wo-128", "cpu")
    return runner


def forced_decode_runs(runner: ModelRunner, ops_runs, steps: int = 4, before_run=None) -> list:
    """For each triton_ops setting of ops_runs: prefill one prompt, then `steps` decode steps fed the first
    run's greedy tokens (so every run sees the same inputs). [(logits, tokens)] a run, logits[0] the
    prefill's. before_run() is called before each run; the switches are restored after."""
    from edgelm.layers import triton_ops

    ids = list(range(3, 20))
    old = triton_ops.set_enabled("0")
    runs: list = []
    try:
        for ops in ops_runs:
            if before_run is not None:
                before_run()
            triton_ops.set_enabled(ops)
            runner.allocator.clear()
            runner.req_to_token_pool.clear()
            driver = Driver(runner)
            reqs = driver.add_requests(1)
            logits = [driver.extend(reqs, [ids])]
            tokens = runs[0][1] if runs else []
            for step in range(steps):
                if not runs:
                    tokens.append(int(logits[-1].argmax(-1)))
                logits.append(driver.decode(reqs, [tokens[step]]))
            runs.append((logits, tokens))
    finally:
        triton_ops.set_enabled(",".join(sorted(old)) or "0")
    return runs
