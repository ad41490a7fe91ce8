"""Server flags: SGLang's names and defaults, values edgelm refuses (with a message), dtype choice."""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import pytest
import torch

from edgelm.model_config import resolve_dtype
from edgelm.server_args import ServerArgs, ServerArgsError, prepare_server_args

# flag → SGLang's default (python/sglang/srt/server_args.py)
SGLANG_DEFAULTS = {
    "--model-path": None, "--tokenizer-path": None, "--load-format": "auto", "--trust-remote-code": False,
    "--revision": None, "--served-model-name": None, "--chat-template": None, "--context-length": None,
    "--dtype": "auto", "--kv-cache-dtype": "auto", "--attention-backend": None, "--torchao-config": "",
    "--quantization": None, "--random-seed": None, "--mem-fraction-static": None,
    "--max-running-requests": None, "--max-queued-requests": None, "--max-total-tokens": None,
    "--chunked-prefill-size": None, "--max-prefill-tokens": 16384, "--schedule-policy": "fcfs",
    "--disable-radix-cache": False, "--cuda-graph-max-bs": None, "--disable-cuda-graph": False,
    "--grammar-backend": None, "--reasoning-parser": None, "--tool-call-parser": None,
    "--host": "127.0.0.1", "--port": 30000, "--api-key": None, "--enable-metrics": False,
    "--log-level": "info", "--log-requests": False, "--decode-log-interval": 40,
}


def _parse(*argv: str) -> ServerArgs:
    return prepare_server_args(list(argv))


def _refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_sglang_flag_names_and_defaults():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert set(SGLANG_DEFAULTS) <= flags
    args = _parse()
    for flag, default in SGLANG_DEFAULTS.items():
        assert getattr(args, flag[2:].replace("-", "_")) == default, flag


def test_every_flag_has_help():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 5, action.dest


def test_sglang_jetson_commands_parse():
    a = _parse("--model-path", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "--device", "cuda", "--dtype", "half",
               "--attention-backend", "flashinfer", "--mem-fraction-static", "0.8", "--context-length", "8192")
    assert (a.model_path, a.device, a.dtype, a.attention_backend) == (
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "cuda", "half", "flashinfer")
    assert a.mem_fraction_static == 0.8 and a.context_length == 8192
    b = _parse("--model-path", "meta-llama/Meta-Llama-3.1-8B-Instruct", "--dtype", "bfloat16",
               "--attention-backend", "triton", "--torchao-config", "int4wo-128", "--grammar-backend", "xgrammar",
               "--host", "0.0.0.0", "--port", "8000", "--disable-radix-cache", "--chunked-prefill-size", "-1",
               "--max-running-requests", "16", "--reasoning-parser", "deepseek-r1", "--tool-call-parser", "llama3")
    assert b.torchao_config == "int4wo-128" and b.grammar_backend == "xgrammar" and b.port == 8000
    assert b.disable_radix_cache is True and b.chunked_prefill_size == -1 and b.max_running_requests == 16
    assert b.reasoning_parser == "deepseek-r1" and b.tool_call_parser == "llama3"


@pytest.mark.parametrize("argv, words", [
    (("--quantization", "awq", "--torchao-config", "int4wo-128"), "drop --torchao-config"),
    (("--quantization", "bnb"), "invalid choice"),
    (("--mem-fraction-static", "1.5"), "mem-fraction-static"),
    (("--mem-fraction-static", "0"), "mem-fraction-static"),
    (("--port", "0"), "--port"),
    (("--chunked-prefill-size", "0"), "-1"),
    (("--context-length", "0"), "--context-length"),
    (("--max-total-tokens", "-5"), "--max-total-tokens"),
    (("--decode-log-interval", "0"), "--decode-log-interval"),
    (("--kv-cache-dtype", "fp8_e5m2"), "invalid choice"),
    (("--attention-backend", "fa3"), "invalid choice"),
    (("--torchao-config", "int3wo"), "invalid choice"),
    (("--dtype", "fp8"), "invalid choice"),
    (("--port", "many"), "invalid int"),
])
def test_refused_with_a_message(capsys, argv, words):
    err = _refused(capsys, *argv)
    assert words in err


def test_refused_in_python_too():
    with pytest.raises(ServerArgsError, match="already quantized"):
        ServerArgs(quantization="gptq", torchao_config="int4wo-128")
    with pytest.raises(ServerArgsError):
        ServerArgs(max_running_requests=0)


def test_dtype_auto_is_float32_on_cpu():
    for cfg_dtype in ("bfloat16", "float16", "float32", None):
        assert resolve_dtype("auto", SimpleNamespace(torch_dtype=cfg_dtype), "cpu") == torch.float32


def test_dtype_names():
    cfg = SimpleNamespace(torch_dtype="bfloat16")
    assert resolve_dtype("half", cfg, "cpu") == resolve_dtype("float16", cfg, "cpu") == torch.float16
    assert resolve_dtype("float", cfg, "cpu") == resolve_dtype("float32", cfg, "cpu") == torch.float32
    assert resolve_dtype("bfloat16", cfg, "cpu") == torch.bfloat16
    # on a GPU, auto keeps a half-precision checkpoint's dtype
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype="float16"), "cuda") == torch.float16
    assert _parse("--dtype", "float").dtype == "float"


def test_dtype_auto_on_cpu_through_model_config(tmp_path):
    from edgelm.model_config import ModelConfig
    from edgelm.model_loader.resolve import resolve_model
    from tests.tiny_models import make_checkpoint

    make_checkpoint("qwen2", tmp_path)
    config = ModelConfig.load(resolve_model(str(tmp_path)), "auto", "cpu", None)
    assert config.dtype == torch.float32 and config.architecture == "Qwen2ForCausalLM"
    assert config.context_len == 256  # the model's max_position_embeddings
    assert ModelConfig.load(resolve_model(str(tmp_path)), "auto", "cpu", 64).context_len == 64


def test_device_auto():
    assert ServerArgs(device="cpu").resolved_device() == "cpu"
    expect = "cuda" if torch.cuda.is_available() else "cpu"
    assert ServerArgs().resolved_device() == expect


def test_grammar_workers(monkeypatch):
    assert ServerArgs(grammar_workers=0).resolved_grammar_workers("cuda") == 0
    assert ServerArgs(grammar_workers=3).resolved_grammar_workers("cpu") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert ServerArgs().resolved_grammar_workers("cuda") == 4
    assert ServerArgs().resolved_grammar_workers("cpu") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # an 8-core Orin
    assert ServerArgs().resolved_grammar_workers("cuda") == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert ServerArgs().resolved_grammar_workers("cuda") == 0
    with pytest.raises(ServerArgsError, match="grammar-workers"):
        ServerArgs(grammar_workers=-1)
