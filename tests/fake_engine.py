"""The real HTTP app (create_app) in a thread, in front of a stand-in engine: a thread that speaks the
engine's ZMQ messages and answers at once. For tests of the HTTP layer (auth, limits, errors,
fuzzing) that need no model; a byte-level tokenizer stands in for the real one."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import jinja2
import zmq

from edgelm.managers import io_struct as io
from edgelm.managers.engine_process import PortArgs
from edgelm.server_args import ServerArgs
from tests.server_fixture import free_port

VOCAB = 256
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


class ByteTokenizer:
    """UTF-8 bytes as token ids; id 0 is EOS."""

    chat_template = CHAT_TEMPLATE
    bos_token_id = None
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True, **_) -> str:
        return bytes(i for i in ids if i or not skip_special_tokens).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, continue_final_message=False,
                            **kwargs) -> str:
        return jinja2.Template(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt, **kwargs)


@dataclass
class FakeEngine:
    """Answers each request with `tokens` tokens ('a', 'b', ...), one every `token_delay_s`. Requests whose
    id starts with 'never-' get no answer; `silent` stops every message (a hung engine)."""

    port_args: PortArgs
    tokens: int = 4
    token_delay_s: float = 0.0
    silent: bool = False
    received: list = field(default_factory=list)
    aborted: list = field(default_factory=list)

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        ctx = zmq.Context()
        recv = ctx.socket(zmq.PULL)
        recv.bind(self.port_args.scheduler_input)
        send = ctx.socket(zmq.PUSH)
        send.connect(self.port_args.tokenizer_input)
        active: dict[str, list] = {}  # rid -> [tokens sent, prompt length, next time]
        last_stats = 0.0
        while not self._stop.is_set():
            while recv.poll(10):
                msg = recv.recv_pyobj()
                if isinstance(msg, io.TokenizedGenerateReq):
                    self.received.append(msg)
                    if not msg.rid.startswith("never-"):
                        active[msg.rid] = [0, len(msg.input_ids), time.monotonic()]
                elif isinstance(msg, io.AbortReq):
                    self.aborted.append(msg.rid)
                    active.pop(msg.rid, None)
                elif isinstance(msg, io.GetInternalStateReq) and not self.silent:
                    send.send_pyobj(self._state(active))
                elif isinstance(msg, io.FlushCacheReq) and not self.silent:
                    send.send_pyobj(io.FlushCacheOut(True, "flushed"))
            if self.silent:
                continue
            now, outs = time.monotonic(), []
            for rid, st in list(active.items()):
                if now < st[2]:
                    continue
                st[0] += 1
                st[2] = now + self.token_delay_s
                done = st[0] >= self.tokens
                outs.append(io.ReqOutput(rid, [ord("a") + (st[0] - 1) % 26], st[1], st[0], 0,
                                         {"type": "length", "length": st[0]} if done else None))
                if done:
                    del active[rid]
            stats = None
            if now - last_stats > 0.2:
                stats, last_stats = self._state(active), now
            if outs or stats:
                send.send_pyobj(io.BatchOutput(outs, stats))
        recv.close(0)
        send.close(0)
        ctx.term()

    @staticmethod
    def _state(active) -> io.InternalState:
        return io.InternalState(len(active), 0, 1000, 1000, 0, 0, 0.0, 0.0, 0)


class FakeProc:
    """What the watchdog asks of the engine's process."""

    pid = 0
    exitcode = None

    def __init__(self):
        self.alive = True
        self.killed = False

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.killed, self.alive, self.exitcode = True, False, -9


class FakeServer:
    """create_app + FakeEngine served by uvicorn in a thread on a free port."""

    def __init__(self, engine_proc=None, **server_args):
        import uvicorn

        from edgelm.entrypoints.http_server import create_app

        self.args = ServerArgs(**server_args)
        self.port_args = PortArgs.new()
        self.engine = FakeEngine(self.port_args)
        self.engine.start()
        info = io.EngineInfo(model_name="fake", model_path="fake", dtype="float32", device="cpu",
                             attention_backend="none", max_total_tokens=1000, max_running_requests=2,
                             context_len=512, vocab_size=VOCAB, weight_gb=0.0, grammar_backend=None)
        self.fatal: list[str] = []
        self.app = create_app(self.args, info, ByteTokenizer(), self.port_args, engine_proc=engine_proc,
                              on_fatal=self.fatal.append)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake server did not start")
            time.sleep(0.05)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=30, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()
