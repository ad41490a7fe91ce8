"""edgelm: a fast LLM serving engine for edge GPUs (Jetson Orin first), any CUDA GPU, and a plain CPU."""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Engine":  # imported lazily: `import edgelm` stays cheap
        from edgelm.entrypoints.engine import Engine

        return Engine
    raise AttributeError(name)
