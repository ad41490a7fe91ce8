"""`python -m edgelm.check_env` (also `edgelm doctor`): what this machine is and what edgelm can run on it.

Prints the platform (Jetson module, L4T/JetPack, power mode), GPU and SM, memory and swap, the
versions of the libraries edgelm uses, which attention backends and --torchao-config values work
here, the defaults edgelm picks for this platform, and warnings. `--json` prints the same as
one JSON object. Needs nothing but torch; works on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform as _pyplatform
import sys

from edgelm.platform import (
    GB,
    PlatformFacts,
    decode_tokens_per_s_bound,
    describe,
    detect_platform,
    platform_defaults,
    platform_warnings,
    probe_gpu,
)

# (import name, distribution names to look for)
_LIBRARIES = (
    ("torch", ("torch",)),
    ("triton", ("triton", "pytorch-triton")),
    ("flashinfer", ("flashinfer-python", "flashinfer")),
    ("xgrammar", ("xgrammar",)),
    ("torchao", ("torchao",)),
    ("transformers", ("transformers",)),
    ("edgelm", ("edgelm",)),
)

# Llama-3.1-8B's shape, for the computed decode-speed bound shown on a Jetson
_LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "tie_word_embeddings": False}


def _probe_gpu():
    return probe_gpu()


def library_versions() -> dict[str, str]:
    out = {"python": _pyplatform.python_version()}
    for name, dists in _LIBRARIES:
        out[name] = "not installed"
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    if out["torch"] != "not installed":
        import torch

        out["torch_cuda"] = torch.version.cuda or "none (CPU build)"
    return out


def attention_backends(facts: PlatformFacts, versions: dict[str, str]) -> dict[str, dict]:
    """{name: {"ok": bool, "reason": str}} from each backend's own check, plus what is missing."""
    device = facts.device
    out = {}
    try:
        from edgelm.layers.attention import check_backend
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
        check_backend, import_error = None, f"{type(exc).__name__}: {exc}"
    for name in ("torch_native", "triton", "flashinfer"):
        lib = {"triton": "triton", "flashinfer": "flashinfer"}.get(name)
        if lib and versions.get(lib) == "not installed":
            extra = "triton" if lib == "triton" else "flashinfer"
            out[name] = {"ok": False, "reason": f"{lib} is not installed (pip install 'edgelm[{extra}]')"}
            continue
        if name != "torch_native" and device != "cuda":
            out[name] = {"ok": False, "reason": "needs a CUDA GPU"}
            continue
        if check_backend is None:
            out[name] = {"ok": False, "reason": import_error}
            continue
        try:
            check_backend(name, device)
            out[name] = {"ok": True, "reason": ""}
        except Exception as exc:  # noqa: BLE001
            out[name] = {"ok": False, "reason": str(exc)}
    return out


def torchao_configs(facts: PlatformFacts, versions: dict[str, str]) -> dict:
    """Which --torchao-config values this machine can run, and why not the rest (the rules of
    edgelm.quantization.torchao_config.check_torchao_config, applied to the detected facts)."""
    from edgelm.server_args import TORCHAO_CONFIGS

    runnable, refused = [], {}
    sm, cuda = facts.sm, facts.device == "cuda"
    no_torchao = versions.get("torchao") == "not installed"
    for name in TORCHAO_CONFIGS:
        if name.startswith("int4wo"):  # edgelm's own kernels, no torchao
            if cuda and versions.get("triton") == "not installed":
                refused[name] = "edgelm's int4 kernels need triton on CUDA (pip install 'edgelm[triton]')"
            elif cuda and sm < (8, 0):
                refused[name] = "edgelm's int4 kernels need SM 8.0+"
            else:
                runnable.append(name)
        elif no_torchao:
            refused[name] = "torchao is not installed (pip install 'edgelm[torchao]')"
        elif name.startswith("fp8") and cuda and sm < (8, 9):
            refused[name] = "FP8 needs a GPU of SM 8.9+ (Ada, Hopper); Orin is SM 8.7"
        elif name.startswith("fp8dq") and not cuda:
            refused[name] = "dynamic FP8 activations need a GPU of SM 8.9+"
        else:
            runnable.append(name)
    notes = []
    if "int4wo-128" in runnable:
        notes.append("AWQ and GPTQ 4-bit checkpoints load onto the same int4 kernels (detected from config.json), "
                     "and so do a GGUF's Q4_0 / Q4_1 / Q4_K layers, as stored (--dequantize-gguf: dense)")
    if not cuda and any(n.startswith("int4wo") for n in runnable):
        from edgelm.quantization.int4_linear import cpu_kernel_available

        if not cpu_kernel_available():
            notes.append("this torch has no CPU int4 kernel: int4wo-* keeps a dense copy of each weight "
                         "(no memory saving, no speed-up)")
    return {"runnable": runnable, "refused": refused, "notes": notes}


def collect(root: str = "/") -> dict:
    facts = detect_platform(root, gpu=_probe_gpu())
    versions = library_versions()
    backends = attention_backends(facts, versions)
    report = {
        "platform": facts.to_dict(),
        "description": describe(facts),
        "versions": versions,
        "attention_backends": backends,
        "torchao_configs": torchao_configs(facts, versions),
        "grammar_backend": "xgrammar" if versions["xgrammar"] != "not installed" else "none",
        "defaults": platform_defaults(facts),
        "warnings": platform_warnings(facts),
    }
    if facts.bandwidth_gbps:
        from edgelm.model_executor.weight_bytes import decode_read_bytes

        report["decode_bound_tok_s"] = {
            f"Llama-3.1-8B {q or 'fp16'}{' + int8 head' if head else ''}": round(decode_tokens_per_s_bound(
                facts.bandwidth_gbps, decode_read_bytes(_LLAMA_8B, "half", q, lm_head_quant=head)), 1)
            for q, head in (("", ""), ("int8wo", ""), ("int4wo-128", ""), ("int4wo-128", "int8"))}
    return report


def format_report(r: dict) -> str:
    p = r["platform"]
    lines = [f"platform      {r['description']}"]
    if p["gpu"]:
        gpu = p["gpu"]
        kind = "integrated, shares the RAM" if p["unified_memory"] else f"{gpu['total_memory'] / GB:.1f} GB"
        lines.append(f"GPU           {gpu['name']}, SM {gpu['sm'][0]}.{gpu['sm'][1]}, "
                     f"{gpu['multi_processor_count']} SMs ({kind})")
    else:
        lines.append("GPU           none visible to torch (CPU path)")
    swap = f"{p['swap_total_bytes'] / GB:.1f} GB" if p["swap_total_bytes"] else "off"
    if p["swap_devices"]:
        swap += f" ({', '.join(p['swap_devices'])})"
    lines.append(f"memory        {p['mem_total_bytes'] / GB:.1f} GB total, {p['mem_available_bytes'] / GB:.1f} GB "
                 f"available; swap {swap}")
    if p["is_jetson"]:
        mode = f"{p['power_mode_name']} (id {p['power_mode_id']})" if p["power_mode_name"] else "unknown"
        lines.append(f"power mode    {mode}")
        if p["bandwidth_gbps"]:
            lines.append(f"bandwidth     {p['bandwidth_gbps']:g} GB/s peak (module data sheet)")
    for key, value in r.get("decode_bound_tok_s", {}).items():
        lines.append(f"  decode ≤ {value:g} tok/s, {key} (computed: bandwidth / bytes read per step, not measured)")
    lines.append("versions")
    for name, version in r["versions"].items():
        lines.append(f"  {name:<13}{version}")
    lines.append("attention backends")
    for name, b in r["attention_backends"].items():
        lines.append(f"  {name:<13}{'yes' if b['ok'] else 'no: ' + b['reason']}")
    t = r["torchao_configs"]
    lines.append(f"--torchao-config runnable: {', '.join(t['runnable']) or 'none'}")
    for reason in sorted(set(t["refused"].values())):
        names = [n for n, why in t["refused"].items() if why == reason]
        lines.append(f"  not {', '.join(names)}: {reason}")
    for note in t["notes"]:
        lines.append(f"  note: {note}")
    lines.append(f"grammar backend: {r['grammar_backend']}")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["defaults"].items())
    lines.append(f"defaults here: {flags}")
    if r["warnings"]:
        lines.append("warnings")
        lines.extend(f"  - {w}" for w in r["warnings"])
    else:
        lines.append("warnings: none")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgelm doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--root", default="/", help=argparse.SUPPRESS)  # recorded files, for tests
    args = parser.parse_args(argv)
    report = collect(args.root)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
