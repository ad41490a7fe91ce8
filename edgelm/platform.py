"""What machine edgelm runs on: a Jetson Orin module (and which), another CUDA GPU, or a CPU.

Every file is read under `root`, so tests can feed files recorded from a device. Sources, in
the order trusted (no NVML: Jetson has none):

- /etc/nv_tegra_release: the L4T release (`# R36 (release), REVISION: 4.3, ...`). Containers see
  it only when it is mounted (jetson-containers' run.sh mounts it).
- /proc/device-tree/compatible and /model: the module's part number (p3701-0005 …) and board
  name. Docker hides /proc/device-tree, so /tmp/nv_jetson_model (a copy jetson-containers'
  run.sh mounts) is read too.
- /proc/meminfo: on a Jetson the GPU shares the RAM, so what the GPU can get is what the OS can
  give (MemAvailable), not what cudaMemGetInfo reports for a discrete card.
- /etc/nvpmodel.conf + /var/lib/nvpmodel/status: the power mode (`pmode:0000`).
- torch.cuda device properties: name, SM, SM count, `is_integrated`.
"""

from __future__ import annotations

import functools
import os
import platform as _pyplatform
import re
from dataclasses import asdict, dataclass, field

GB = 1 << 30

# L4T release → JetPack release (NVIDIA's release notes; JetPack 6 is L4T r36).
_JETPACK_BY_L4T = {
    "36.5.0": "6.2.1", "36.4.7": "6.2.1", "36.4.4": "6.2.1", "36.4.3": "6.2", "36.4.2": "6.1.1",
    "36.4.0": "6.1", "36.3.0": "6.0", "36.2.0": "6.0 DP", "35.6.2": "5.1.5", "35.6.1": "5.1.5",
    "35.6.0": "5.1.4", "35.5.0": "5.1.3", "35.4.1": "5.1.2", "35.3.1": "5.1.1", "35.2.1": "5.1",
}


@dataclass(frozen=True)
class OrinModule:
    """One Jetson Orin module: memory, peak DRAM bandwidth (NVIDIA's module data sheets) and GPU size.

    `super_bandwidth_gbps` is the figure in the MAXN_SUPER power mode that JetPack 6.2 added for
    Orin Nano and Orin NX (None where the mode does not raise the memory clock)."""

    key: str
    name: str
    parts: tuple[str, ...]  # P37xx SKUs, as in /proc/device-tree/compatible
    memory_gb: int
    bandwidth_gbps: float
    super_bandwidth_gbps: float | None
    gpu_sms: int  # 128 CUDA cores each


ORIN_MODULES: tuple[OrinModule, ...] = (
    OrinModule("agx-orin-64gb", "Jetson AGX Orin 64GB", ("p3701-0005", "p3701-0008"), 64, 204.8, None, 16),
    OrinModule("agx-orin-32gb", "Jetson AGX Orin 32GB", ("p3701-0004", "p3701-0000"), 32, 204.8, None, 14),
    OrinModule("orin-nx-16gb", "Jetson Orin NX 16GB", ("p3767-0000",), 16, 102.4, None, 8),
    OrinModule("orin-nx-8gb", "Jetson Orin NX 8GB", ("p3767-0001",), 8, 102.4, None, 8),
    OrinModule("orin-nano-8gb", "Jetson Orin Nano 8GB", ("p3767-0003", "p3767-0005"), 8, 68.0, 102.0, 8),
    OrinModule("orin-nano-4gb", "Jetson Orin Nano 4GB", ("p3767-0004",), 4, 34.0, 51.0, 4),
)
MODULES_BY_KEY = {m.key: m for m in ORIN_MODULES}


@dataclass
class GpuInfo:
    name: str
    sm: tuple[int, int]
    total_memory: int
    multi_processor_count: int
    is_integrated: bool
    free_memory: int = 0  # cudaMemGetInfo's free bytes (meaningful on discrete GPUs only)


@dataclass
class PlatformFacts:
    arch: str
    is_jetson: bool = False
    l4t_version: str | None = None
    jetpack_version: str | None = None
    board_model: str | None = None  # device-tree model string
    module: str | None = None  # OrinModule.key
    module_name: str | None = None
    gpu: GpuInfo | None = None
    unified_memory: bool = False  # GPU and CPU share the RAM (Jetson, other integrated GPUs)
    mem_total_bytes: int = 0
    mem_available_bytes: int = 0
    swap_total_bytes: int = 0
    swap_free_bytes: int = 0
    swap_devices: list[str] = field(default_factory=list)  # from /proc/swaps
    power_mode_id: int | None = None
    power_mode_name: str | None = None
    power_modes: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how facts were found, or why not

    @property
    def device(self) -> str:
        return "cuda" if self.gpu is not None else "cpu"

    @property
    def sm(self) -> tuple[int, int] | None:
        return self.gpu.sm if self.gpu else None

    @property
    def orin_module(self) -> OrinModule | None:
        return MODULES_BY_KEY.get(self.module) if self.module else None

    @property
    def super_mode(self) -> bool:
        return bool(self.power_mode_name and "SUPER" in self.power_mode_name.upper())

    @property
    def bandwidth_gbps(self) -> float | None:
        """Peak DRAM bandwidth of the module in its current power mode; None off Jetson."""
        m = self.orin_module
        if m is None:
            return None
        return m.super_bandwidth_gbps if self.super_mode and m.super_bandwidth_gbps else m.bandwidth_gbps

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(device=self.device, bandwidth_gbps=self.bandwidth_gbps, super_mode=self.super_mode)
        d["power_modes"] = {str(k): v for k, v in self.power_modes.items()}
        return d


# ---------------------------------------------------------------------------- file readers
def _read(root: str, path: str, limit: int = 1 << 20) -> str | None:
    """Text of root/path (device-tree strings: NULs become newlines); None if unreadable."""
    full = os.path.join(root, path.lstrip("/"))
    try:
        with open(full, "rb") as f:
            data = f.read(limit)
    except OSError:
        return None
    return data.decode("utf-8", "replace").replace("\x00", "\n").strip()


def parse_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, ...' → '36.4.3'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def jetpack_for_l4t(l4t: str) -> str | None:
    if l4t in _JETPACK_BY_L4T:
        return _JETPACK_BY_L4T[l4t]
    major = l4t.split(".")[0]
    return {"36": "6.x", "35": "5.x", "34": "5.0", "32": "4.x"}.get(major)


def _l4t_from_dpkg(root: str) -> str | None:
    """Version of the nvidia-l4t-core package ('36.4.3-20250107174145' → '36.4.3')."""
    text = _read(root, "/var/lib/dpkg/status", limit=16 << 20)
    if not text:
        return None
    m = re.search(r"^Package: nvidia-l4t-core\n(?:[^\n]+\n)*?Version: (\d+\.\d+\.\d+)", text, re.M)
    return m.group(1) if m else None


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo → bytes per key."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)(?:\s+kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def parse_nvpmodel(conf: str | None, status: str | None) -> tuple[int | None, str | None, dict[int, str]]:
    """(current id, current name, {id: name}) from /etc/nvpmodel.conf and /var/lib/nvpmodel/status.
    Without a status file the mode is the conf's PM_CONFIG DEFAULT (what boot applies)."""
    modes: dict[int, str] = {}
    default = None
    for line in (conf or "").splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        m = re.match(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)", line)
        if m:
            modes[int(m.group(1))] = m.group(2)
        m = re.match(r"<\s*PM_CONFIG\s+DEFAULT=(\d+)", line)
        if m:
            default = int(m.group(1))
    current = None
    m = re.search(r"pmode:\s*(\d+)", status or "")
    if m:
        current = int(m.group(1))
    elif default is not None:
        current = default
    return current, modes.get(current) if current is not None else None, modes


def _module_from_parts(compatible: str) -> OrinModule | None:
    for part in re.findall(r"p37\d\d-\d{4}", compatible.lower()):
        for m in ORIN_MODULES:
            if part in m.parts:
                return m
    return None


def _module_from_model(model: str, mem_total: int) -> OrinModule | None:
    """Family from the board name, size from MemTotal (the kernel sees a little less than the
    module's RAM: carve-outs)."""
    s = model.lower()
    gib = mem_total / GB
    if "agx orin" in s:
        return MODULES_BY_KEY["agx-orin-64gb" if gib > 40 else "agx-orin-32gb"]
    if "orin nx" in s:
        return MODULES_BY_KEY["orin-nx-16gb" if gib > 10 else "orin-nx-8gb"]
    if "orin nano" in s:
        return MODULES_BY_KEY["orin-nano-8gb" if gib > 5 else "orin-nano-4gb"]
    return None


def _module_from_gpu(gpu: GpuInfo, mem_total: int) -> OrinModule | None:
    """SM count and memory tell all Orin modules apart but Orin NX 8GB from Orin Nano 8GB."""
    if gpu.sm != (8, 7):  # not an Orin (Thor is SM 11.0)
        return None
    gib = mem_total / GB
    if gpu.multi_processor_count >= 16:
        return MODULES_BY_KEY["agx-orin-64gb"]
    if gpu.multi_processor_count >= 14:
        return MODULES_BY_KEY["agx-orin-32gb"]
    if gpu.multi_processor_count <= 4:
        return MODULES_BY_KEY["orin-nano-4gb"]
    if gib > 10:
        return MODULES_BY_KEY["orin-nx-16gb"]
    return None


def probe_gpu() -> GpuInfo | None:
    """Device 0 as torch sees it; None without torch or CUDA. Initializes CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    free, _ = torch.cuda.mem_get_info(0)
    return GpuInfo(name=p.name, sm=(p.major, p.minor), total_memory=int(p.total_memory),
                   multi_processor_count=int(p.multi_processor_count),
                   is_integrated=bool(getattr(p, "is_integrated", False)), free_memory=int(free))


@functools.cache
def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (a torch.device, or its index); what kernels size persistent grids by."""
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


_PROBE = object()


def detect_platform(root: str = "/", gpu: GpuInfo | None | object = _PROBE,
                    machine: str | None = None) -> PlatformFacts:
    """Facts about this machine. `gpu` defaults to probing torch; pass a GpuInfo or None (tests)."""
    gpu_info: GpuInfo | None = probe_gpu() if gpu is _PROBE else gpu  # type: ignore[assignment]
    facts = PlatformFacts(arch=machine or _pyplatform.machine(), gpu=gpu_info)

    mem = parse_meminfo(_read(root, "/proc/meminfo") or "")
    facts.mem_total_bytes = mem.get("MemTotal", 0)
    facts.mem_available_bytes = mem.get("MemAvailable", mem.get("MemFree", 0))
    facts.swap_total_bytes = mem.get("SwapTotal", 0)
    facts.swap_free_bytes = mem.get("SwapFree", 0)
    swaps = _read(root, "/proc/swaps") or ""
    facts.swap_devices = [line.split()[0] for line in swaps.splitlines()[1:] if line.strip()]

    release = _read(root, "/etc/nv_tegra_release")
    if release:
        facts.l4t_version = parse_tegra_release(release)
    if facts.l4t_version is None:
        facts.l4t_version = _l4t_from_dpkg(root)
    if facts.l4t_version:
        facts.jetpack_version = jetpack_for_l4t(facts.l4t_version)

    compatible = _read(root, "/proc/device-tree/compatible") or ""
    model = _read(root, "/proc/device-tree/model") or _read(root, "/tmp/nv_jetson_model")
    facts.board_model = model or None
    tegra_board = "tegra" in compatible.lower() or "jetson" in (model or "").lower()
    # Inside a container without the mounts above, torch still shows an integrated Tegra GPU
    # ("Orin", SM 8.7); other integrated aarch64 GPUs (DGX Spark's GB10) are not Jetsons.
    tegra_gpu = bool(gpu_info and gpu_info.is_integrated and facts.arch in ("aarch64", "arm64")
                     and (gpu_info.sm == (8, 7) or any(n in gpu_info.name.lower() for n in ("orin", "thor"))))
    facts.is_jetson = bool(release or tegra_board or tegra_gpu)
    facts.unified_memory = facts.is_jetson or bool(gpu_info and gpu_info.is_integrated)

    if facts.is_jetson:
        module = _module_from_parts(compatible)
        if module is None and model:
            module = _module_from_model(model, facts.mem_total_bytes)
        if module is None and gpu_info is not None:
            module = _module_from_gpu(gpu_info, facts.mem_total_bytes)
        if module is not None:
            facts.module, facts.module_name = module.key, module.name
        else:
            facts.notes.append("Orin module not identified: inside a container, mount the board name with "
                               "`-v /tmp/nv_jetson_model:/tmp/nv_jetson_model:ro` after "
                               "`cat /proc/device-tree/model > /tmp/nv_jetson_model` on the host")
        if not release:
            facts.notes.append("/etc/nv_tegra_release not visible: mount it with "
                               "`-v /etc/nv_tegra_release:/etc/nv_tegra_release:ro`")
        facts.power_mode_id, facts.power_mode_name, facts.power_modes = parse_nvpmodel(
            _read(root, "/etc/nvpmodel.conf"), _read(root, "/var/lib/nvpmodel/status"))
    return facts


# ---------------------------------------------------------------------------- what follows
def platform_defaults(facts: PlatformFacts) -> dict:
    """ServerArgs values for flags the user left unset (keys are ServerArgs field names).

    On a Jetson `mem_fraction_static` is a fraction of what the OS can give at start-up
    (MemAvailable), since the GPU shares the RAM with the OS and every other program."""
    if not facts.is_jetson:
        if facts.device == "cuda":
            return {"mem_fraction_static": 0.85 if not facts.unified_memory else 0.8}
        return {"mem_fraction_static": 0.3}
    gib = (facts.mem_total_bytes or 0) / GB
    if gib > 40:  # AGX Orin 64GB
        return {"mem_fraction_static": 0.8, "cuda_graph_max_bs": 32, "chunked_prefill_size": 2048,
                "max_running_requests": 32}
    if gib > 20:  # AGX Orin 32GB
        return {"mem_fraction_static": 0.8, "cuda_graph_max_bs": 24, "chunked_prefill_size": 2048,
                "max_running_requests": 24}
    if gib > 10:  # Orin NX 16GB
        return {"mem_fraction_static": 0.75, "cuda_graph_max_bs": 16, "chunked_prefill_size": 1024,
                "max_running_requests": 16}
    if gib > 5:  # Orin NX 8GB, Orin Nano 8GB
        return {"mem_fraction_static": 0.7, "cuda_graph_max_bs": 8, "chunked_prefill_size": 512,
                "max_running_requests": 8}
    return {"mem_fraction_static": 0.65, "cuda_graph_max_bs": 4, "chunked_prefill_size": 256,
            "max_running_requests": 4}


def best_power_mode(facts: PlatformFacts) -> tuple[int, str] | None:
    """The uncapped mode of this module's nvpmodel.conf (MAXN_SUPER before MAXN)."""
    for wanted in ("MAXN_SUPER", "MAXN"):
        for mode_id, name in facts.power_modes.items():
            if name.upper() == wanted:
                return mode_id, name
    return None


def platform_warnings(facts: PlatformFacts) -> list[str]:
    """What an operator should fix before serving, one sentence each."""
    out: list[str] = []
    if facts.is_jetson:
        if facts.l4t_version and int(facts.l4t_version.split(".")[0]) < 36:
            out.append(f"L4T {facts.l4t_version} (JetPack {facts.jetpack_version}): edgelm needs JetPack 6 "
                       "(L4T r36) or newer, where torch>=2.5 wheels for Jetson exist")
        if facts.gpu is None:
            out.append("this is a Jetson but torch sees no CUDA GPU: install torch from the Jetson wheel index "
                       "(https://pypi.jetson-ai-lab.io/jp6/cu126), not PyPI's CPU wheel, or run the container "
                       "with --runtime nvidia")
        if facts.swap_total_bytes == 0:
            out.append("swap is off: when weights + KV pool leave the OS little room, the kernel's OOM killer "
                       "ends the server; add a swap file on NVMe (docs/jetson.md)")
        elif facts.swap_devices and all("zram" in d for d in facts.swap_devices):
            out.append("only zram swap (compressed RAM) is on: it takes RAM from the GPU under pressure; a swap "
                       "file on NVMe is better for serving (docs/jetson.md)")
        best = best_power_mode(facts)
        if facts.power_mode_name is not None and best and facts.power_mode_id != best[0]:
            out.append(f"power mode is {facts.power_mode_name} (id {facts.power_mode_id}), which caps the "
                       f"clocks: `sudo nvpmodel -m {best[0]}` selects {best[1]}, then `sudo jetson_clocks`")
        if facts.power_mode_name is None:
            out.append("power mode unknown (/etc/nvpmodel.conf, /var/lib/nvpmodel/status not readable); "
                       "check with `sudo nvpmodel -q` that it is MAXN")
        out.extend(facts.notes)
    if facts.unified_memory and facts.mem_total_bytes:
        held = facts.mem_total_bytes - facts.mem_available_bytes
        if held > 0.25 * facts.mem_total_bytes:
            out.append(f"other programs hold {held / GB:.1f} GB of the {facts.mem_total_bytes / GB:.1f} GB that "
                       "the GPU shares; stop them (e.g. the desktop: `sudo systemctl isolate multi-user.target`) "
                       "for a larger KV cache")
    if facts.gpu is not None and facts.gpu.sm < (7, 0):
        out.append(f"SM {facts.gpu.sm[0]}.{facts.gpu.sm[1]} is older than edgelm's Triton kernels support "
                   "(SM 7.0+); use --attention-backend torch_native")
    return out


def decode_tokens_per_s_bound(bandwidth_gbps: float, weight_bytes: int, kv_bytes: int = 0) -> float:
    """Computed upper bound on single-stream decode speed: every step reads the weights (see
    weight_bytes.decode_read_bytes) and the request's KV once from DRAM. Real figures are lower
    (kernel efficiency, launch gaps, the CPU's share of the bus)."""
    return bandwidth_gbps * 1e9 / max(1, weight_bytes + kv_bytes)


def describe(facts: PlatformFacts) -> str:
    """One line: 'Jetson AGX Orin 64GB (L4T 36.4.3, JetPack 6.2), aarch64'."""
    if facts.is_jetson:
        name = facts.module_name or facts.board_model or "Jetson (module unknown)"
        rel = f"L4T {facts.l4t_version}, JetPack {facts.jetpack_version}" if facts.l4t_version else "L4T unknown"
        return f"{name} ({rel}), {facts.arch}"
    if facts.gpu is not None:
        return f"CUDA GPU {facts.gpu.name}, {facts.arch}"
    return f"CPU only, {facts.arch}"
