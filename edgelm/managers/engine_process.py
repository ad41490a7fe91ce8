"""The engine process: model runner + scheduler, started by the HTTP server or the offline Engine."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s] %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S",
                        force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class PortArgs:
    """ZMQ addresses: the tokenizer manager sends to `scheduler_input`, the scheduler to `tokenizer_input`."""

    scheduler_input: str
    tokenizer_input: str

    @classmethod
    def new(cls) -> PortArgs:
        base = os.path.join(tempfile.gettempdir(), f"edgelm-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return cls(f"ipc://{base}-sched", f"ipc://{base}-tok")


def apply_platform_defaults(server_args) -> None:
    """Fill flags the user left unset with this platform's defaults (Jetson modules get smaller
    graph batches and prefill chunks), and log what was detected and any warnings."""
    from edgelm.platform import describe, detect_platform, platform_defaults, platform_warnings

    try:
        facts = detect_platform()
    except Exception as exc:  # detection is advisory: never block start-up on it
        logger.warning("platform detection failed: %s", exc)
        return
    if server_args.resolved_device() != facts.device:
        return
    logger.info("platform: %s", describe(facts))
    for key, value in platform_defaults(facts).items():
        if getattr(server_args, key, None) is None:
            setattr(server_args, key, value)
    for warning in platform_warnings(facts):
        logger.warning(warning)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the process that started us is gone (no orphaned engines holding the GPU)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def run_engine_process(server_args, port_args: PortArgs, ready_conn, parent_pid: int) -> None:
    import zmq

    configure_logging(server_args.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        import torch

        from edgelm.managers.io_struct import EngineInfo
        from edgelm.managers.scheduler import Scheduler
        from edgelm.managers.tokenizer_utils import load_tokenizer
        from edgelm.model_config import ModelConfig
        from edgelm.model_executor.memory_planner import GB
        from edgelm.model_executor.model_runner import ModelRunner
        from edgelm.model_loader.resolve import resolve_model

        if server_args.random_seed is not None:
            torch.manual_seed(server_args.random_seed)
        device = server_args.resolved_device()
        resolved = resolve_model(server_args.model_path, server_args.revision)
        model_config = ModelConfig.load(resolved, server_args.dtype, device, server_args.context_length,
                                        server_args.trust_remote_code)
        runner = ModelRunner(server_args, model_config, device)
        tokenizer = load_tokenizer(server_args, resolved)
        ctx = zmq.Context(2)
        recv = ctx.socket(zmq.PULL)
        recv.bind(port_args.scheduler_input)
        send = ctx.socket(zmq.PUSH)
        send.connect(port_args.tokenizer_input)
        scheduler = Scheduler(server_args, runner, tokenizer, recv, send)
        info = EngineInfo(
            model_name=server_args.served_model_name or server_args.model_path or resolved.display_name,
            model_path=server_args.model_path or resolved.display_name,
            dtype=str(model_config.dtype).replace("torch.", ""),
            device=device,
            attention_backend=runner.attention_backend_name,
            max_total_tokens=runner.max_total_tokens,
            max_running_requests=runner.max_running_requests,
            context_len=model_config.context_len,
            vocab_size=model_config.vocab_size,
            weight_gb=runner.weight_bytes / GB,  # GiB, as the memory plan's lines
            grammar_backend="xgrammar" if scheduler.grammar.enabled else None,
        )
        logger.info("engine ready: model %s, dtype %s, device %s, attention %s, weights %.2f GB, "
                    "KV pool %d tokens, max running requests %d, context %d", info.model_name, info.dtype,
                    device, info.attention_backend, info.weight_gb, info.max_total_tokens,
                    info.max_running_requests, info.context_len)
    except BaseException as exc:  # report start-up failures to the parent with their message
        logger.error("engine failed to start: %s", exc)
        logger.debug("%s", traceback.format_exc())
        ready_conn.send(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    # SIGTERM (e.g. a supervisor stopping the whole process group): finish the requests in flight, then
    # exit; the HTTP server drains its side meanwhile
    signal.signal(signal.SIGTERM, lambda *_: scheduler.request_stop())
    ready_conn.send(("ok", info))
    ready_conn.close()
    scheduler.event_loop()
    logger.info("engine stopped")


def spawn_engine_process(server_args, port_args: PortArgs):
    """Start the engine process; `wait_engine_ready` then waits for it (do other start-up work between)."""
    apply_platform_defaults(server_args)
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_engine_process, args=(server_args, port_args, child_conn, os.getpid()),
                       daemon=True, name="edgelm-engine")
    proc.start()
    child_conn.close()
    return proc, parent_conn


def start_engine_process(server_args, port_args: PortArgs, timeout_s: float | None = None):
    """Start the engine and wait until it is ready. Returns (process, EngineInfo); raises with the
    engine's own message when it cannot start."""
    proc, conn = spawn_engine_process(server_args, port_args)
    return proc, wait_engine_ready(proc, conn, timeout_s)


def wait_engine_ready(proc, parent_conn, timeout_s: float | None = None):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not parent_conn.poll(0.5):
        if not proc.is_alive():
            raise RuntimeError(f"the engine process exited during start-up (code {proc.exitcode})")
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the engine did not start in time")
    try:
        status, payload = parent_conn.recv()
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"the engine process exited during start-up (code {proc.exitcode}); if this is a "
                           "script, start the Engine under `if __name__ == '__main__':`") from None
    if status != "ok":
        proc.join(5)
        raise RuntimeError(payload)
    return payload
