"""The scheduler: admits requests, forms prefill (chunked) and decode batches, runs the model,
samples, and streams token ids back to the tokenizer manager.

One loop iteration is one forward pass. Prefill has priority when something is waiting and the
KV pool can take it; otherwise the running requests decode. When decode cannot get a KV slot for
every running request, the request with the least progress is retracted: its KV goes into the
radix cache (so little is recomputed) and it waits at the head of the queue to resume.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque

import torch
import zmq

from edgelm.managers import io_struct as io
from edgelm.managers.grammar_hooks import GrammarHooks
from edgelm.managers.schedule_batch import Req
from edgelm.managers.scheduler_output import SchedulerOutputMixin
from edgelm.mem_cache.radix_cache import ChunkCache, RadixCache
from edgelm.model_executor.forward_batch import ForwardBatch
from edgelm.sampling.sampling_batch_info import Penalizer

logger = logging.getLogger(__name__)

# share of its remaining max_new_tokens that admission reserves for each running request;
# decays towards the floor while nothing is retracted, jumps back up after a retraction
_INIT_NEW_TOKEN_RATIO, _MIN_NEW_TOKEN_RATIO, _NEW_TOKEN_RATIO_DECAY = 0.7, 0.1, 0.001
_STATS_INTERVAL_S = 1.0
# after SIGTERM the engine finishes its requests, but stops after this long at most
_DRAIN_TIMEOUT_S = 60.0
# consecutive failed steps that no single request explains before every request is failed
_MAX_FAILED_STEPS = 3


class Scheduler(SchedulerOutputMixin):
    def __init__(self, server_args, model_runner, tokenizer, recv_sock: zmq.Socket, send_sock: zmq.Socket):
        self.args = server_args
        self.runner = model_runner
        self.tokenizer = tokenizer
        self.recv_sock = recv_sock
        self.send_sock = send_sock
        cfg = model_runner.model_config
        self.model_config = cfg
        self.device = model_runner.device
        self.vocab_size = cfg.vocab_size
        self.context_len = cfg.context_len
        self.eos_token_ids = set(cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        cache_cls = ChunkCache if server_args.disable_radix_cache else RadixCache
        self.tree_cache = cache_cls(model_runner.req_to_token_pool, model_runner.allocator)
        self.max_running = model_runner.max_running_requests
        self.max_total_tokens = model_runner.max_total_tokens
        chunk = server_args.chunked_prefill_size
        if chunk is None:
            chunk = 8192 if self.device == "cuda" else 2048
        self.chunk_size = None if chunk == -1 else chunk
        self.max_prefill_tokens = server_args.max_prefill_tokens
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        self.reqs: dict[str, Req] = {}
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        self.rng = random.Random(server_args.random_seed)
        self.grammar = GrammarHooks.create(server_args, tokenizer, self.vocab_size, self.eos_token_ids, self.device,
                                           max_running=self.max_running)
        # overlap scheduling: a decode step's sampled tokens stay on the device and feed the next
        # forward, launched before this process reads them; `pending` is that step (reqs, samples)
        self.overlap = server_args.resolved_overlap_schedule(self.device)
        self.pending: tuple[list[Req], object] | None = None
        self.overlapped_steps = 0  # decode steps launched before the previous step was read
        # statistics
        self.step = 0
        self.decode_steps = 0
        self.gen_tokens_since_log = 0
        self.decode_tokens_total = 0  # tokens decode steps added to requests (rows of finished ones not counted)
        self.last_log_time = time.perf_counter()
        self.last_gen_throughput = 0.0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.last_stats_time = 0.0
        self.outbox: list[io.ReqOutput] = []
        # robustness: SIGTERM time (drain, then stop), the request being admitted (blamed for a failed
        # admission), consecutive failed steps, and fault injection for tests (rids "fault-*", "hang-*")
        self.stop_requested: float | None = None
        self.admitting: Req | None = None
        self.failed_steps = 0
        self.fault_inject = os.environ.get("EDGELM_FAULT_INJECT") == "1"

    @classmethod
    def in_process(cls, server_args, model_runner, tokenizer, name: str = "local"):
        """A scheduler driven by the caller (step_once), its outputs on a local socket: (scheduler,
        sink, context). For benchmarks and tests; destroy the context when done."""
        ctx = zmq.Context()
        recv = ctx.socket(zmq.PULL)
        recv.bind(f"inproc://{name}-in")
        send = ctx.socket(zmq.PUSH)
        send.connect(f"inproc://{name}-out")
        sink = ctx.socket(zmq.PULL)
        sink.bind(f"inproc://{name}-out")
        return cls(server_args, model_runner, tokenizer, recv, send), sink, ctx

    # ================================================================== loop
    def event_loop(self) -> None:
        while not self._should_stop():
            idle = not self.has_work()
            self.recv_requests(block=idle)
            if idle:  # the decode log's throughput window starts when work does, not before the idle wait
                self.last_log_time, self.gen_tokens_since_log = time.perf_counter(), 0
            try:
                self.step_once()
                self.failed_steps = 0
            except Exception as exc:  # a fault outside a batch's forward / sampling: keep serving
                self.fail_step(exc)

    def request_stop(self) -> None:
        """SIGTERM: finish the requests in flight, then return from the loop."""
        if self.stop_requested is None:
            self.stop_requested = time.monotonic()
            logger.info("stop requested: draining %d requests", len(self.reqs))

    def _should_stop(self) -> bool:
        if self.stop_requested is None:
            return False
        return not self.has_work() or time.monotonic() - self.stop_requested > _DRAIN_TIMEOUT_S

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self.pending)

    def step_once(self) -> None:
        self.handle_aborts()
        if self.chunked_req is not None or self.waiting:
            if self.run_prefill():
                self.flush_outputs()
                return
        if self.running:
            self.run_decode()
        elif self.pending is not None:  # every request of the in-flight step finished before it
            self.finish_pending()
        self.flush_outputs()

    # ================================================================== input
    def recv_requests(self, block: bool) -> None:
        timeout = 1000 if block else 0
        while self.recv_sock.poll(timeout):
            timeout = 0
            msg = self.recv_sock.recv_pyobj()
            try:
                self.handle_message(msg)
            except Exception as exc:  # a bad message fails that request, never the loop
                logger.exception("error handling %s", type(msg).__name__)
                rid = getattr(msg, "rid", None)
                if rid is not None:
                    self.outbox.append(io.ReqOutput(rid, [], 0, 0, 0, {"type": "abort"}, error=(500, str(exc))))

    def handle_message(self, msg) -> None:
        if isinstance(msg, io.TokenizedGenerateReq):
            self.add_request(msg)
        elif isinstance(msg, io.AbortReq):
            self.abort(msg.rid)
        elif isinstance(msg, io.FlushCacheReq):
            self.send_sock.send_pyobj(self.flush_cache())
        elif isinstance(msg, io.GetInternalStateReq):
            self.send_sock.send_pyobj(self.internal_state())
        else:
            logger.warning("unknown message %r", type(msg))

    def add_request(self, msg: io.TokenizedGenerateReq) -> None:
        params = msg.sampling_params
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        req = Req(msg.rid, msg.input_ids, params, seed, msg.return_logprob, msg.top_logprobs_num)
        req.grammar_key = msg.grammar_key
        req.grammar_after_think = msg.grammar_after_think
        if len(req.origin_input_ids) + 1 > self.max_total_tokens or len(req.origin_input_ids) >= self.context_len:
            self.outbox.append(io.ReqOutput(
                req.rid, [], len(req.origin_input_ids), 0, 0, {"type": "abort"},
                error=(400, f"the prompt has {len(req.origin_input_ids)} tokens: more than this server's "
                            f"context ({self.context_len}) or KV pool ({self.max_total_tokens}) can hold")))
            return
        if params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty:
            req.penalizer = Penalizer(req.origin_input_ids, [], self.vocab_size, self.device)
        if req.grammar_key is not None:
            error = self.grammar.start(req)
            if error:
                self.outbox.append(io.ReqOutput(req.rid, [], len(req.origin_input_ids), 0, 0,
                                                {"type": "abort"}, error=(400, error)))
                return
        self.reqs[req.rid] = req
        self.waiting.append(req)

    def abort(self, rid: str) -> None:
        req = self.reqs.get(rid)
        if req is not None:
            req.to_abort = True

    def handle_aborts(self) -> None:
        aborted = [r for r in self.reqs.values() if r.to_abort and not r.finished()]
        for req in aborted:
            req.finished_reason = {"type": "abort"}
            if req in self.waiting:
                self.waiting.remove(req)
                self.release(req, kv_len=0)
            elif req is self.chunked_req:
                self.chunked_req = None
                self.release(req, kv_len=req.computed_len)
            elif req in self.running:
                self.running.remove(req)
                self.release(req, kv_len=req.computed_len)
            self.emit(req)

    # ================================================================== prefill
    def _sorted_waiting(self) -> list[Req]:
        if self.args.schedule_policy == "lpm" and len(self.waiting) > 1 and isinstance(self.tree_cache, RadixCache):
            lens = {id(r): len(self.tree_cache.match_prefix(r.origin_input_ids + r.output_ids)[0])
                    for r in self.waiting}
            return sorted(self.waiting, key=lambda r: -lens[id(r)])
        return list(self.waiting)

    def _reserved_decode_tokens(self) -> int:
        """KV the running requests will still need, as admission estimates it."""
        return sum(int(max(r.sampling_params.max_new_tokens - len(r.output_ids), 0) * self.new_token_ratio)
                   for r in self.running)

    def _free_kv(self) -> int:
        return self.runner.allocator.available_size() + self.tree_cache.evictable_size()

    def run_prefill(self) -> bool:
        budget = self.chunk_size if self.chunk_size is not None else self.max_prefill_tokens
        budget = min(budget, self.max_prefill_tokens) if self.chunk_size is None else budget
        batch: list[tuple[Req, int, int]] = []  # (req, prefix_len, extend_len)
        reserve = self._reserved_decode_tokens()

        if self.chunked_req is not None:
            req = self.chunked_req
            take = min(len(req.fill_ids) - req.computed_len, budget)
            if not self._ensure_free(take):
                return False
            batch.append((req, req.computed_len, take))
            budget -= take
            self.chunked_req = None

        batch_tokens = sum(take for _, _, take in batch)  # KV slots the batch takes at the forward
        for req in self._sorted_waiting():
            self.admitting = req
            if budget <= 0 or len(self.running) + len(batch) >= self.max_running:
                break
            if not self.grammar.ready(req):
                continue
            if req.finished():  # the grammar failed to compile
                self.waiting.remove(req)
                self.release(req, kv_len=0)
                self.emit(req)
                continue
            if self.runner.req_to_token_pool.available_size() == 0:
                break
            req.init_fill_ids()
            prefix, node = self.tree_cache.match_prefix(req.fill_ids[:-1])
            extend_total = len(req.fill_ids) - len(prefix)
            if self.chunk_size is None and extend_total > budget and batch:
                break
            take = extend_total if self.chunk_size is None else min(extend_total, budget)
            remaining_out = max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)
            need = batch_tokens + take + int(remaining_out * self.new_token_ratio) + reserve
            self.tree_cache.inc_lock_ref(node)
            if need > self._free_kv() and (self.running or batch):
                self.tree_cache.dec_lock_ref(node)
                break
            if not self._ensure_free(batch_tokens + take):
                self.tree_cache.dec_lock_ref(node)
                break
            req.prefix_indices, req.last_node = prefix, node
            req.req_pool_idx = self.runner.req_to_token_pool.alloc()
            if len(prefix):
                self.runner.req_to_token_pool.write(req.req_pool_idx, 0, prefix)
            req.computed_len = len(prefix)
            if not req.output_ids:  # a resumed request keeps its first admission's figure
                req.cached_tokens = len(prefix)
                self.prompt_tokens_total += len(req.origin_input_ids)
                self.cached_tokens_total += len(prefix)
            self.waiting.remove(req)
            batch.append((req, len(prefix), take))
            budget -= take
            batch_tokens += take
            reserve += int(remaining_out * self.new_token_ratio)
        self.admitting = None

        if not batch:
            return False
        self.forward_extend(batch)
        return True

    def _ensure_free(self, n: int) -> bool:
        """Make `n` KV slots allocatable, evicting unlocked cache entries if needed."""
        short = n - self.runner.allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)
        return self.runner.allocator.available_size() >= n

    def forward_extend(self, batch: list[tuple[Req, int, int]]) -> None:
        self.finish_pending()  # the next decode batch then starts from tokens on the host
        reqs = [r for r, _, _ in batch]
        total = sum(take for _, _, take in batch)
        out_cache_loc = None
        try:
            out_cache_loc = self.runner.allocator.alloc(total)
            if out_cache_loc is None:
                raise RuntimeError(f"KV pool has no room for {total} prefill tokens (admission checked it)")
            input_ids, offset = [], 0
            for req, prefix_len, take in batch:
                input_ids.extend(req.fill_ids[prefix_len:prefix_len + take])
                self.runner.req_to_token_pool.write(req.req_pool_idx, prefix_len,
                                                    out_cache_loc[offset:offset + take])
                offset += take
            fb = ForwardBatch.for_extend(input_ids, [r.req_pool_idx for r in reqs], [p for _, p, _ in batch],
                                         [t for _, _, t in batch], out_cache_loc, self.device)
            self._inject_fault(reqs)
            logits = self.runner.forward(fb)
        except Exception as exc:  # the batch fails; the KV this step wrote is dropped
            self.fail_batch(reqs, exc, kv_lens=[p for _, p, _ in batch], new_slots=out_cache_loc)
            return

        done = []
        for i, (req, prefix_len, take) in enumerate(batch):
            req.computed_len = prefix_len + take
            self.tree_cache.cache_unfinished_req(req, req.computed_len)
            if req.computed_len < len(req.fill_ids):
                self.chunked_req = req
            else:
                done.append(i)
        self.log_prefill(len(batch), total, sum(p for _, p, _ in batch))
        if done:
            reqs = [batch[i][0] for i in done]
            rows = torch.tensor(done, device=logits.device) if len(done) != len(batch) else None
            try:
                self.sample_and_update(reqs, logits if rows is None else logits.index_select(0, rows))
            except Exception as exc:
                self.fail_batch([r for r in reqs if not r.finished()], exc)
            for req in reqs:
                if not req.finished():
                    self.running.append(req)

    # ================================================================== decode
    def run_decode(self) -> None:
        """One decode step. With overlap scheduling, the step's forward is launched with the previous
        step's samples still on the device, its sampling right behind it (after the previous step is
        processed when a grammar or penalties need those tokens); the previous step's results are read
        and processed while the GPU computes. A request that finished in the previous step has one
        extra row in this step, dropped."""
        if self.pending is not None and not self._ensure_free(len(self.running)):
            self.finish_pending()  # retraction below needs every request's tokens on the host
        self._make_room_for_decode()
        reqs = list(self.running)
        if not reqs:
            self.finish_pending()
            return
        pending, self.pending = self.pending, None
        self.overlapped_steps += pending is not None
        loc = None
        try:
            loc = self.runner.allocator.alloc(len(reqs))
            pool_idx = [r.req_pool_idx for r in reqs]
            if pending is None:
                ids = [r.output_ids[-1] for r in reqs]
                seq_lens = [r.seqlen for r in reqs]
            else:  # the in-flight tokens are not in output_ids yet: one more position each
                ids = self._inflight_ids(pending, reqs)
                seq_lens = [r.seqlen + 1 for r in reqs]
            # the model runner records `loc` in req_to_token as part of the forward
            fb = ForwardBatch.for_decode(ids, pool_idx, seq_lens, loc, self.device, lazy=True)
            self._inject_fault(reqs)
            logits = self.runner.forward(fb)
        except Exception as exc:
            if pending is not None:
                self._process_pending(pending)
            reqs = [r for r in reqs if not r.finished()]
            self.fail_batch(reqs, exc, kv_lens=[r.computed_len for r in reqs], new_slots=loc)
            return
        for r in reqs:
            r.computed_len += 1
        if pending is not None and any(r.grammar is not None or r.penalizer is not None for r in reqs):
            # a grammar mask or penalties need the in-flight tokens applied before this step samples
            self._process_pending(pending)
            pending = None
        out = failure = None
        try:
            # sampling goes right behind the forward on the GPU; the in-flight tokens are not in
            # output_ids yet, hence the step offset (seeded sampling counts positions)
            out = self.launch_sample(reqs, logits, step_offset=0 if pending is None else 1)
        except Exception as exc:
            failure = exc
        if pending is not None:
            self._process_pending(pending)  # the GPU is busy with this step meanwhile
        if failure is not None:
            self.fail_batch([r for r in reqs if not r.finished()], failure)
        elif self.overlap:
            self.pending = (reqs, out)
        else:
            self._process_pending((reqs, out))
        self.decode_steps += 1
        self.new_token_ratio = max(self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY, _MIN_NEW_TOKEN_RATIO)
        if self.decode_steps % self.args.decode_log_interval == 0:
            self.log_decode()

    def _make_room_for_decode(self) -> None:
        while self.running and not self._ensure_free(len(self.running)):
            # retract the request that has made the least progress (cheapest to redo)
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
            self.running.remove(victim)
            self.retract(victim)
            self.new_token_ratio = _INIT_NEW_TOKEN_RATIO

    def retract(self, req: Req) -> None:
        logger.info("KV pool full: retracting request %s (%d tokens) to resume later", req.rid, req.seqlen)
        req.retractions += 1
        req.fill_ids = req.origin_input_ids + req.output_ids
        self.tree_cache.cache_finished_req(req, req.computed_len)
        req.prefix_indices = torch.empty(0, dtype=torch.int64)
        req.last_node = None
        req.computed_len = 0
        self.waiting.appendleft(req)

    # ================================================================== faults
    def fail_batch(self, reqs: list[Req], exc: Exception, kv_lens: list[int] | None = None,
                   new_slots: torch.Tensor | None = None) -> None:
        """A step failed: its requests fail with a 500, the others go on. `kv_lens`: KV known good
        per request (it goes to the prefix cache); `new_slots`: this step's slots, freed unread."""
        logger.error("a batch of %d requests failed (%s: %s); failing them, serving the others", len(reqs),
                     type(exc).__name__, exc, exc_info=exc)
        message = f"internal error while running the model: {type(exc).__name__}: {exc}"
        for i, req in enumerate(reqs):
            req.finished_reason = {"type": "abort", "error": (500, message)}
            if req in self.running:
                self.running.remove(req)
            if req in self.waiting:
                self.waiting.remove(req)
            if req is self.chunked_req:
                self.chunked_req = None
            self.release(req, kv_len=req.computed_len if kv_lens is None else kv_lens[i])
            self.emit(req)
        if new_slots is not None:
            self.runner.allocator.free(new_slots)

    def fail_step(self, exc: Exception) -> None:
        """A step raised outside a forward or sampling: fail the request being admitted if there was
        one; after repeated unexplained failures, fail every request and reset the KV pools."""
        self.failed_steps += 1
        suspect, self.admitting = self.admitting, None
        if suspect is not None and not suspect.finished() and self.failed_steps < _MAX_FAILED_STEPS:
            try:
                self.fail_batch([suspect], exc)
            except Exception:
                logger.exception("could not fail request %s cleanly", suspect.rid)
            self.flush_outputs()
            return
        logger.error("scheduler step failed (%d in a row)", self.failed_steps, exc_info=exc)
        if self.failed_steps < _MAX_FAILED_STEPS:
            return
        message = f"internal error in the scheduler: {type(exc).__name__}: {exc}"
        for req in list(self.reqs.values()):
            req.finished_reason = {"type": "abort", "error": (500, message)}
            self.emit(req)
        self.reqs.clear()
        self.waiting.clear()
        self.running.clear()
        self.chunked_req = None
        self.tree_cache.reset()
        self.runner.allocator.clear()
        self.runner.req_to_token_pool.clear()
        self.failed_steps = 0
        self.flush_outputs()

    def _inject_fault(self, reqs: list[Req]) -> None:
        """Tests only (EDGELM_FAULT_INJECT=1): a request whose id starts with 'fault-' makes the forward
        raise ('faultdecode-': from its 4th output token on); 'hang-' makes it hang (the watchdog's case)."""
        if not self.fault_inject:
            return
        for req in reqs:
            if req.rid.startswith("fault-") or (req.rid.startswith("faultdecode-") and len(req.output_ids) > 3):
                raise RuntimeError(f"injected fault for request {req.rid}")
            if req.rid.startswith("hang-"):
                logger.warning("injected hang for request %s", req.rid)
                while True:
                    time.sleep(3600)

    # ================================================================== bookkeeping
    def release(self, req: Req, kv_len: int) -> None:
        """Free a finished or aborted request's slot; its computed KV goes into the prefix cache."""
        if req.req_pool_idx is not None:
            req.fill_ids = (req.origin_input_ids + req.output_ids)[:max(kv_len, len(req.fill_ids))]
            self.tree_cache.cache_finished_req(req, kv_len)
        self.grammar.release(req)
        if req.finished():
            self.reqs.pop(req.rid, None)

    def emit(self, req: Req) -> None:
        new = req.output_ids[req.sent_len:]
        if not new and not req.finished():
            return
        req.sent_len = len(req.output_ids)
        out = io.ReqOutput(req.rid, new, len(req.origin_input_ids), len(req.output_ids), req.cached_tokens,
                           req.finished_reason)
        if req.return_logprob:
            out.logprobs, req.pending_logprobs = req.pending_logprobs, []
            out.top_logprobs, req.pending_top_logprobs = req.pending_top_logprobs, []
        if req.finished_reason and "error" in req.finished_reason:
            out.error = req.finished_reason["error"]
        self.outbox.append(out)

    def flush_outputs(self) -> None:
        now = time.perf_counter()
        stats = None
        if now - self.last_stats_time >= _STATS_INTERVAL_S:
            self.last_stats_time = now
            stats = self.internal_state()
        if self.outbox or stats is not None:
            self.send_sock.send_pyobj(io.BatchOutput(self.outbox, stats))
            self.outbox = []
        self.step += 1

    def used_tokens(self) -> int:
        return (self.max_total_tokens - self.runner.allocator.available_size()
                - self.tree_cache.evictable_size())

    def internal_state(self) -> io.InternalState:
        hit = self.cached_tokens_total / self.prompt_tokens_total if self.prompt_tokens_total else 0.0
        return io.InternalState(
            num_running_reqs=len(self.running) + (self.chunked_req is not None),
            num_waiting_reqs=len(self.waiting),
            max_total_tokens=self.max_total_tokens,
            available_kv_tokens=self.runner.allocator.available_size(),
            evictable_kv_tokens=self.tree_cache.evictable_size(),
            used_kv_tokens=self.used_tokens(),
            cache_hit_rate=hit,
            last_gen_throughput=self.last_gen_throughput,
            step=self.step,
        )

    def flush_cache(self) -> io.FlushCacheOut:
        if self.has_work():
            return io.FlushCacheOut(False, "requests are running; flush when the server is idle")
        self.tree_cache.reset()
        self.runner.allocator.clear()
        self.runner.req_to_token_pool.clear()
        return io.FlushCacheOut(True, "cache flushed")

    # ================================================================== logs (SGLang's format)
    def log_prefill(self, n_seq: int, n_new: int, n_cached: int) -> None:
        logger.info("Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                    "#running-req: %d, #queue-req: %d", n_seq, n_new, n_cached,
                    self.used_tokens() / self.max_total_tokens, len(self.running), len(self.waiting))

    def log_decode(self) -> None:
        now = time.perf_counter()
        self.last_gen_throughput = self.gen_tokens_since_log / max(now - self.last_log_time, 1e-6)
        self.last_log_time, self.gen_tokens_since_log = now, 0
        logger.info("Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): "
                    "%.2f, #queue-req: %d", len(self.running), self.used_tokens(),
                    self.used_tokens() / self.max_total_tokens, self.last_gen_throughput, len(self.waiting))
