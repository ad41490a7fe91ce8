"""The offline API: `edgelm.Engine(model_path=...).generate(prompts, sampling_params)`.

The same engine process as the server runs underneath; a private event loop in a thread drives
the tokenizer manager, so this class is usable from plain synchronous code.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from edgelm.managers.engine_process import (
    PortArgs,
    configure_logging,
    spawn_engine_process,
    wait_engine_ready,
)
from edgelm.managers.tokenizer_manager import GenerateRequest, TokenizerManager
from edgelm.managers.tokenizer_utils import load_tokenizer
from edgelm.model_loader.resolve import resolve_model
from edgelm.sampling.sampling_params import SamplingParams
from edgelm.server_args import ServerArgs


def make_sampling_params(d: dict[str, Any] | SamplingParams | None, vocab_size: int) -> SamplingParams:
    if isinstance(d, SamplingParams):
        params = d
    else:
        d = dict(d or {})
        unknown = set(d) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        params = SamplingParams(**d)
    params.verify(vocab_size)
    return params


class Engine:
    def __init__(self, log_level: str = "error", **kwargs):
        self.server_args = ServerArgs(log_level=log_level, **kwargs)
        configure_logging(self.server_args.log_level)
        self.port_args = PortArgs.new()
        self.proc, conn = spawn_engine_process(self.server_args, self.port_args)
        self.tokenizer = load_tokenizer(self.server_args, resolve_model(self.server_args.model_path,
                                                                        self.server_args.revision))
        self.info = wait_engine_ready(self.proc, conn)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="edgelm-engine-loop")
        self.thread.start()
        self.tm = self._run(self._make_tm())

    async def _make_tm(self) -> TokenizerManager:
        return TokenizerManager(self.server_args, self.info, self.tokenizer, self.port_args)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 top_logprobs_num: int = 0) -> dict | list[dict]:
        """Complete one prompt (a dict back) or a list of them (a list back), all in one batch."""
        single = isinstance(prompt, str) or (input_ids is not None and input_ids and isinstance(input_ids[0], int))
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = [self.tokenizer.encode(p) for p in prompts]
        elif input_ids is not None:
            ids = [input_ids] if single else list(input_ids)
        else:
            raise ValueError("give prompt or input_ids")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids)
        reqs = [GenerateRequest(i, make_sampling_params(p, self.info.vocab_size), return_logprob=return_logprob,
                                top_logprobs_num=top_logprobs_num) for i, p in zip(ids, params)]

        async def run_all():
            return await asyncio.gather(*(self.tm.generate_full(r) for r in reqs))

        results = [{
            "text": c.text, "output_ids": c.token_ids,
            "meta_info": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                          "cached_tokens": c.cached_tokens, "finish_reason": c.finish_reason,
                          **({"output_token_logprobs": c.logprobs} if return_logprob else {})},
        } for c in self._run(run_all())]
        return results[0] if single else results

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
        self.proc = None
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.tm.close)
            self.loop.call_soon_threadsafe(self.loop.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
