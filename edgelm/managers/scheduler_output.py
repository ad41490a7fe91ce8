"""What a decode or prefill step's samples become: sampling launched on the device, read back
(behind an event, so an overlapped next step does not delay the read), then outputs, stop checks,
grammar advance and the release of finished requests. With overlap scheduling one step is in
flight (`Scheduler.pending`): its samples feed the next forward on the device before the host
reads them here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from edgelm.sampling.sampling_batch_info import SamplingBatchInfo

if TYPE_CHECKING:
    from edgelm.managers.schedule_batch import Req


class HostSamples:
    """A step's samples on their way to the host: copied without blocking right behind the
    sampler, so reading them waits for that step only, not for whatever was queued after it (a
    plain .tolist() would also wait for the next step's forward, launched meanwhile). `device` keeps
    the samples on the GPU for the next forward's input ids."""

    def __init__(self, out):
        self.device = out
        self.event = None
        if out.next_token_ids.is_cuda:
            self.host = type(out)(*(None if t is None else t.to("cpu", non_blocking=True) for t in (
                out.next_token_ids, out.logprobs, out.top_logprobs, out.top_ids)))
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = out

    def wait(self):
        if self.event is not None:
            self.event.synchronize()
        return self.host


class SchedulerOutputMixin:
    """Part of Scheduler (self is the scheduler)."""

    def _inflight_ids(self, pending, reqs: list[Req]) -> torch.Tensor:
        """The device token ids of `reqs` (all in the pending step) from its samples."""
        pend_reqs, out = pending
        ids = out.device.next_token_ids
        if len(pend_reqs) == len(reqs) and all(a is b for a, b in zip(pend_reqs, reqs)):
            return ids
        row = {id(r): i for i, r in enumerate(pend_reqs)}
        return ids.index_select(0, torch.tensor([row[id(r)] for r in reqs], device=ids.device))

    def _process_pending(self, pending) -> None:
        """A decode step's samples: applied, and counted for the throughput log."""
        try:
            added = self.process_sample(*pending)
            self.gen_tokens_since_log += added
            self.decode_tokens_total += added
        except Exception as exc:
            self.fail_batch([r for r in pending[0] if not r.finished()], exc)

    def finish_pending(self) -> None:
        """Read and process the in-flight step's samples now (before anything that needs every
        request's tokens on the host: a prefill, a retraction, an idle wait)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self._process_pending(pending)

    def sample_and_update(self, reqs: list[Req], logits: torch.Tensor) -> None:
        self.process_sample(reqs, self.launch_sample(reqs, logits))

    def launch_sample(self, reqs: list[Req], logits: torch.Tensor, step_offset: int = 0):
        """Mask (grammar) and sample on the device; nothing is read back. Requests the grammar fails
        here (a rejected token) are finished and released at once."""
        before = [r.finished() for r in reqs]
        info = SamplingBatchInfo.from_reqs(reqs, self.vocab_size, self.device, step_offset)
        self.grammar.apply_mask(reqs, logits)
        out = self.runner.sample(logits, info)
        for req, was in zip(reqs, before):
            if req.finished() and not was:
                self._finish(req)
                self.emit(req)
        return HostSamples(out)

    def process_sample(self, reqs: list[Req], out) -> int:
        """Read a step's samples back and apply them: outputs, stops, grammar, release of finished
        requests. Rows of requests already finished (an earlier step, an abort) are dropped: under
        overlap a request that finished in the previous step still has a row here. Returns how many
        tokens were added."""
        out = out.wait()
        next_ids = out.next_token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        added = 0
        for i, (req, tok) in enumerate(zip(reqs, next_ids)):
            if req.finished():
                continue
            added += 1
            req.output_ids.append(tok)
            if req.penalizer is not None:
                req.penalizer.add(tok)
            if req.return_logprob and logprobs is not None:
                req.pending_logprobs.append(logprobs[i])
                if req.top_logprobs_num and top_lp is not None:
                    k = req.top_logprobs_num
                    req.pending_top_logprobs.append(list(zip(top_ids[i][:k], top_lp[i][:k])))
            self.grammar.accept(req, tok)
            req.check_finished(self.eos_token_ids, self.context_len, self._stop_string_matched)
            if req.finished():
                self._finish(req)
            self.emit(req)
        self.grammar.dispatch(reqs)
        return added

    def _finish(self, req: Req) -> None:
        if req in self.running:
            self.running.remove(req)
        self.release(req, kv_len=req.computed_len)

    def _stop_string_matched(self, req: Req) -> str | None:
        stops = req.sampling_params.stop
        window = max(len(s) for s in stops) + 4
        tail = self.tokenizer.decode(req.output_ids[-window:],
                                     skip_special_tokens=req.sampling_params.skip_special_tokens)
        for s in stops:
            if s in tail:
                return s
        return None
