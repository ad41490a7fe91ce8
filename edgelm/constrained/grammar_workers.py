"""Grammar matchers in worker processes, so their host work leaves the scheduler's thread.

Each step a constrained request's matcher must accept the sampled token and fill its bitmask row.
On the scheduler's thread that work adds to the step wherever the forward does not hide it: a tiny
model on a big GPU (the host is the bottleneck), or states xgrammar finds costly (a long
length-bounded string: 200+ µs a row). Python threads do not fix it: xgrammar releases the GIL
inside its calls, but 8 threads contending for it around them made each row 2-10x slower on the
H100 host (benchmarks/results/grammar_overhead_*_h100.json, fill_work_ms_per_step).

So the matchers live in `--grammar-workers` processes. Per step the scheduler sends each worker one
message (the tokens its requests sampled) right after sampling; the workers advance their matchers
and fill their rows of a shared-memory bitmask while the scheduler emits outputs, prepares and
launches the next forward. `apply_mask` then only waits for replies (usually already there) and
gathers the rows.

Grammars still compile in the scheduler process (the backend's thread pool and cache). A compiled
grammar travels to a worker once, serialized, and is deserialized there on a background thread
(xgrammar releases the GIL), so a new schema never stalls the other requests on that worker; the
request itself waits in the queue until its worker has it and the first mask is filled.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from collections import OrderedDict
from multiprocessing.shared_memory import SharedMemory

import torch

from edgelm.constrained.base import Grammar

logger = logging.getLogger(__name__)

_MAX_KEYS_PER_WORKER = 64  # compiled grammars a worker keeps (least recently used leave first)


class WorkerGrammar(Grammar):
    """The scheduler's handle on a matcher living in a worker: tokens are queued and sent once per
    step, termination is mirrored (a stop token the masked sampler picked was allowed, so the
    matcher accepted it), and a rejection reported by the worker is seen at the next mask."""

    def __init__(self, pool: GrammarWorkerPool, key, worker: int, mid: int, slot: int):
        self.pool, self.key, self.worker, self.mid, self.slot = pool, key, worker, mid, slot
        self.pending: list[int] = []  # tokens not yet sent
        self.in_flight = False  # a step (advance + fill) sent, its reply not yet received
        self.loaded = False  # the worker has the matcher and its first mask is filled
        self.rejected = False  # the worker's matcher refused a token
        self.terminated = False
        self.released = False

    def accept_token(self, token_id: int) -> bool:
        if self.rejected:
            return False
        self.pending.append(int(token_id))
        if token_id in self.pool.stop_ids:
            self.terminated = True
        return True

    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self.pool.wait([self])
        bitmask[row].copy_(self.pool.shared_mask[self.slot])

    def is_terminated(self) -> bool:
        return self.terminated

    def copy(self) -> WorkerGrammar:
        return self.pool.new_matcher(self.key)

    def rollback(self, num_tokens: int) -> None:
        keep = len(self.pending) - num_tokens
        if keep >= 0:
            del self.pending[keep:]
            return
        self.pool.wait([self])
        del self.pending[:]
        self.pool.queue(self.worker, ("rollback", self.mid, -keep))
        self.terminated = False
        self.pool.step([self])  # refill the row for the state rolled back to

    def release(self) -> None:
        self.pool.release(self)


class GrammarWorkerPool:
    """`num_workers` processes holding matchers; a shared int32 bitmask `[max_matchers, words]`,
    one row (slot) per live matcher. Used from the scheduler's thread only."""

    def __init__(self, num_workers: int, tokenizer_info, vocab_size: int, stop_ids, max_matchers: int):
        self.num_workers = num_workers
        self.words = (vocab_size + 31) // 32
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self._shm = SharedMemory(create=True, size=max(1, max_matchers) * self.words * 4)
        self.shared_mask = torch.frombuffer(self._shm.buf, dtype=torch.int32).view(max_matchers, self.words)
        self.shared_mask.fill_(-1)
        self._free_slots = list(range(max_matchers - 1, -1, -1))
        self._next_mid = 0
        self._live: dict[int, WorkerGrammar] = {}
        self._load = [0] * num_workers  # live matchers per worker
        self._keys: list[OrderedDict] = [OrderedDict() for _ in range(num_workers)]  # keys each worker holds
        self._ops: list[list] = [[] for _ in range(num_workers)]
        self.worker_busy_s = 0.0  # summed over workers: time spent on ops (for benchmarks)
        self.dead: set[int] = set()  # workers that exited
        ctx = mp.get_context("spawn")  # the scheduler holds a CUDA context: never fork it
        self._conns, self._procs = [], []
        # the engine runs as a daemon process, which multiprocessing does not let start children (they
        # could be orphaned); ours read a pipe from this process and exit when it closes, so lift the
        # flag while they start
        me = mp.current_process()
        was_daemon, me.daemon = me.daemon, False
        try:
            self._start_workers(ctx, num_workers, max_matchers)
        finally:
            me.daemon = was_daemon
        info_json = tokenizer_info.serialize_json()
        # the tokenizer's vocabulary (MBs) goes down each pipe on a thread: the worker reads it only
        # once it has imported torch and xgrammar (seconds), and start-up should not wait for that
        self._started = threading.Thread(target=lambda: [c.send(info_json) for c in self._conns],
                                         name="grammar-workers-start", daemon=True)
        self._started.start()

    def _start_workers(self, ctx, num_workers: int, max_matchers: int) -> None:
        for w in range(num_workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, self._shm.name, max_matchers, self.words,
                                                          sorted(self.stop_ids)),
                               name=f"edgelm-grammar-{w}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    # ------------------------------------------------------------------ scheduler side
    def new_matcher(self, key, serialized: str | None = None) -> WorkerGrammar | None:
        """A matcher at the start state on the least-loaded worker, its first mask being filled;
        None when every slot is taken (the caller keeps the matcher in-process)."""
        alive = [w for w in range(self.num_workers) if w not in self.dead]
        if not self._free_slots or not alive:
            return None
        worker = min(alive, key=lambda w: self._load[w])
        slot = self._free_slots.pop()
        mid = self._next_mid
        self._next_mid += 1
        handle = WorkerGrammar(self, key, worker, mid, slot)
        self._live[mid] = handle
        self._load[worker] += 1
        keys = self._keys[worker]
        send = None
        if key in keys:
            keys.move_to_end(key)
        else:
            if serialized is None:
                raise ValueError("the worker does not hold this grammar: pass its serialized form")
            send = serialized
            keys[key] = True
            while len(keys) > _MAX_KEYS_PER_WORKER:
                old, _ = keys.popitem(last=False)
                self._ops[worker].append(("forget", old))
        self._ops[worker].append(("new", mid, key, send, slot))
        handle.in_flight = True
        self.send()
        return handle

    def queue(self, worker: int, op) -> None:
        self._ops[worker].append(op)

    def step(self, handles) -> None:
        """Send each handle's queued tokens, to be accepted and its row refilled (one message per
        worker)."""
        for h in handles:
            if h.released or h.rejected or h.in_flight:  # in flight: `wait` sends the rest later
                continue
            self._ops[h.worker].append(("step", h.mid, h.pending, h.slot))
            h.pending = []
            h.in_flight = True
        self.send()

    def send(self) -> None:
        if self._started.is_alive():  # the vocabulary must go down each pipe before any op
            self._started.join()
        for w, ops in enumerate(self._ops):
            if ops:
                self._ops[w] = []
                if w in self.dead:
                    continue
                try:
                    self._conns[w].send(ops)
                except OSError:
                    self._lost(w)

    def poll(self) -> None:
        """Take every reply already there, without blocking."""
        for w, conn in enumerate(self._conns):
            try:
                while w not in self.dead and conn.poll():
                    self._take(conn.recv())
            except (EOFError, OSError):
                self._lost(w)

    def _lost(self, w: int) -> None:
        """A worker exited (killed, out of memory): its requests fail (their masks are gone), new ones
        go to the other workers, or in-process when none is left."""
        if w in self.dead:
            return
        self.dead.add(w)
        logger.error("grammar worker %d exited (code %s): its requests fail; new ones avoid it", w,
                     self._procs[w].exitcode if w < len(self._procs) else None)
        for h in list(self._live.values()):
            if h.worker == w:
                h.in_flight = False
                h.rejected = True
                h.loaded = True  # nothing more will come: ready() and wait() stop waiting

    def wait(self, handles) -> None:
        """Block until every handle's mask is filled with all its tokens accepted."""
        lagging = [h for h in handles if h.pending and not h.released and not h.rejected]
        if lagging:  # tokens accepted since the last step was sent
            for h in lagging:
                if h.in_flight:
                    self._wait_one(h)
            self.step(lagging)
        for h in handles:
            self._wait_one(h)

    def _wait_one(self, h: WorkerGrammar) -> None:
        conn = self._conns[h.worker]
        while h.in_flight:
            try:
                if not self._procs[h.worker].is_alive() and not conn.poll():
                    raise EOFError
                if conn.poll(1.0):
                    self._take(conn.recv())
            except (EOFError, OSError):
                self._lost(h.worker)

    def _take(self, message) -> None:
        replies, busy_s = message
        self.worker_busy_s += busy_s
        for mid, ok, error in replies:
            h = self._live.get(mid)
            if h is None:
                continue
            h.in_flight = False
            if h.released:  # its worker will not write its slot again
                self._drop(h)
                continue
            h.loaded = True
            if not ok:
                h.rejected = True
                if error:
                    logger.warning("grammar worker: matcher %d: %s", mid, error)

    def release(self, h: WorkerGrammar) -> None:
        if h.released:
            return
        h.released = True
        self._ops[h.worker].append(("free", h.mid))
        self._load[h.worker] -= 1
        if not h.in_flight:  # else the slot waits for the reply: the worker may still write it
            self._drop(h)

    def _drop(self, h: WorkerGrammar) -> None:
        self._live.pop(h.mid, None)
        self._free_slots.append(h.slot)

    def shutdown(self) -> None:
        if not self._procs:
            return
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
        self._procs = []
        del self.shared_mask
        try:
            self._shm.close()
        except BufferError:  # a view of the bitmask is still alive somewhere: the mapping goes at exit
            pass
        self._shm.unlink()


# ---------------------------------------------------------------------- worker process
def _worker_main(conn, shm_name: str, rows: int, words: int, stop_ids: list[int]) -> None:
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import xgrammar as xgr

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is the parent's to handle
    shm = SharedMemory(name=shm_name)
    mask = torch.frombuffer(shm.buf, dtype=torch.int32).view(rows, words)
    info = xgr.TokenizerInfo.deserialize_json(conn.recv())
    loader = ThreadPoolExecutor(1, thread_name_prefix="grammar-load")
    compiled: dict = {}  # key -> Future[CompiledGrammar]
    matchers: dict[int, tuple] = {}  # mid -> (key, matcher or None until loaded)
    waiting: list = []  # ops for matchers whose grammar is still being deserialized

    def run(op, replies) -> bool:
        kind = op[0]
        if kind == "forget":
            compiled.pop(op[1], None)
            return True
        mid = op[1]
        if kind == "free":
            matchers.pop(mid, None)
            return True
        if kind == "new":
            _, mid, key, serialized, slot = op
            if serialized is not None and key not in compiled:  # (a retried op finds it submitted)
                compiled[key] = loader.submit(xgr.CompiledGrammar.deserialize_json, serialized, info)
            future = compiled.get(key)
            if future is None:
                replies.append((mid, False, "grammar not loaded"))
                return True
            if not future.done():
                return False
            try:
                matcher = xgr.GrammarMatcher(future.result(), override_stop_tokens=stop_ids or None)
                matcher.fill_next_token_bitmask(mask, slot)
                matchers[mid] = matcher
                replies.append((mid, True, None))
            except Exception as exc:  # noqa: BLE001 (reported to the scheduler, which fails the request)
                replies.append((mid, False, f"{type(exc).__name__}: {exc}"))
            return True
        matcher = matchers.get(mid)
        if matcher is None:  # freed, or its load failed
            replies.append((mid, False, None))
            return True
        if kind == "rollback":
            matcher.rollback(op[2])
            return True
        _, mid, tokens, slot = op  # "step"
        ok = True
        for t in tokens:
            if matcher.is_terminated():
                break
            if not matcher.accept_token(t):
                ok = False
                break
        if ok and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(mask, slot)
        replies.append((mid, ok, None if ok else f"token {t} rejected"))
        return True

    while True:
        if waiting:
            if not conn.poll(0.002):
                replies: list = []
                start = time.perf_counter()
                waiting = _retry(waiting, run, replies)
                if replies:
                    conn.send((replies, time.perf_counter() - start))
                continue
        try:
            ops = conn.recv()
        except (EOFError, OSError):
            break
        if ops is None:
            break
        start = time.perf_counter()
        replies = []
        if waiting:
            waiting = _retry(waiting, run, replies)
        for op in ops:
            # ops behind a waiting op for the same matcher keep their order
            if any(w[1] == op[1] for w in waiting) or not run(op, replies):
                waiting.append(op)
        if replies:
            conn.send((replies, time.perf_counter() - start))
    loader.shutdown(wait=False, cancel_futures=True)
    # the mapping goes with the process (the bitmask tensor still exports it: no close())


def _retry(waiting: list, run, replies: list) -> list:
    left = []
    for op in waiting:
        if any(w[1] == op[1] for w in left) or not run(op, replies):
            left.append(op)
    return left
