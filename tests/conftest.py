"""Shared test set-up.

Triton kernels are tested on the CPU through Triton's interpreter, so TRITON_INTERPRET must be set
before triton is first imported. GPU-only tests carry ``@pytest.mark.gpu`` and are skipped where
torch sees no CUDA device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_gguf():
    from edgelm.model_loader.resolve import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def server():
    """One real server (embedded model, CPU) shared by every HTTP test module. Its grammar matchers
    live in two worker processes (the default on a CUDA host; tests of the in-process path are in
    test_grammar.py)."""
    from tests.server_fixture import ServerProcess

    s = ServerProcess("--random-seed", "0", "--decode-log-interval", "10", "--reasoning-parser", "deepseek-r1",
                      "--enable-metrics", "--grammar-workers", "2")
    yield s
    s.stop()
