"""Platform detection from files in the formats a Jetson Orin writes them (L4T r36 / JetPack 6).

The fixtures below are written in the exact formats of /etc/nv_tegra_release, the device tree,
/proc/meminfo, /proc/swaps, /etc/nvpmodel.conf and /var/lib/nvpmodel/status; their values are
typical of each module, not captured from one particular board.
"""

import json
import os

import pytest

from edgelm import check_env
from edgelm.platform import (
    GB,
    GpuInfo,
    decode_tokens_per_s_bound,
    describe,
    detect_platform,
    parse_meminfo,
    parse_nvpmodel,
    parse_tegra_release,
    platform_defaults,
    platform_warnings,
)

TEGRA_R36_4_3 = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
                 "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n"
                 "TARGET_USERSPACE_LIB_DIR=nvidia\nTARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n")
TEGRA_R35_4_1 = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
                 "DATE: Tue Aug  1 19:57:35 UTC 2023\n")

MEMINFO_AGX64 = """MemTotal:       64335836 kB
MemFree:        52117204 kB
MemAvailable:   60123548 kB
Buffers:           61220 kB
Cached:          7901452 kB
SwapCached:            0 kB
SwapTotal:      32167904 kB
SwapFree:       32167904 kB
"""
MEMINFO_AGX32 = """MemTotal:       31919604 kB
MemFree:        24071520 kB
MemAvailable:   28854164 kB
SwapTotal:             0 kB
SwapFree:              0 kB
"""
MEMINFO_NANO8 = """MemTotal:        7802172 kB
MemFree:         4516420 kB
MemAvailable:    6250184 kB
SwapTotal:       3901072 kB
SwapFree:        3901072 kB
"""
SWAPS_ZRAM = """Filename				Type		Size		Used		Priority
/dev/zram0                              partition	5361352		0		5
/dev/zram1                              partition	5361352		0		5
"""
SWAPS_NVME = """Filename				Type		Size		Used		Priority
/ssd/16GB.swap                          file		16777212	0		-2
"""

NVPMODEL_AGX = """# Jetson AGX Orin power modes (excerpt)
< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online
< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=MODE_15W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=2 NAME=MODE_30W >
< POWER_MODEL ID=3 NAME=MODE_50W >
< PM_CONFIG DEFAULT=3 >
"""
NVPMODEL_NANO_SUPER = """< POWER_MODEL ID=0 NAME=15W >
< POWER_MODEL ID=1 NAME=25W >
< POWER_MODEL ID=2 NAME=MAXN_SUPER >
< POWER_MODEL ID=3 NAME=7W >
< PM_CONFIG DEFAULT=2 >
"""

ORIN_GPU_64 = GpuInfo("Orin", (8, 7), 64335836 * 1024, 16, True)
ORIN_GPU_8 = GpuInfo("Orin", (8, 7), 7802172 * 1024, 8, True)
H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 85 * GB, 132, False, free_memory=84 * GB)


def write_root(tmp_path, files: dict[str, str]) -> str:
    for path, text in files.items():
        full = tmp_path / path.lstrip("/")
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(text)
    return str(tmp_path)


def agx64_files(status="pmode:0000 fmode:quiet\n", swaps=SWAPS_ZRAM):
    return {
        "/etc/nv_tegra_release": TEGRA_R36_4_3,
        "/proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit\x00",
        "/proc/device-tree/compatible": "nvidia,p3737-0000+p3701-0005\x00nvidia,p3701-0005\x00nvidia,tegra234\x00",
        "/proc/meminfo": MEMINFO_AGX64,
        "/proc/swaps": swaps,
        "/etc/nvpmodel.conf": NVPMODEL_AGX,
        "/var/lib/nvpmodel/status": status,
    }


def test_parsers():
    assert parse_tegra_release(TEGRA_R36_4_3) == "36.4.3"
    assert parse_tegra_release("# R36 (release), REVISION: 4.0, GCID: 1") == "36.4.0"
    assert parse_meminfo(MEMINFO_AGX64)["MemAvailable"] == 60123548 * 1024
    assert parse_nvpmodel(NVPMODEL_AGX, "pmode:0002 fmode:quiet") == (
        2, "MODE_30W", {0: "MAXN", 1: "MODE_15W", 2: "MODE_30W", 3: "MODE_50W"})
    assert parse_nvpmodel(NVPMODEL_AGX, None)[:2] == (3, "MODE_50W")  # no status: boot default


def test_agx_orin_64gb(tmp_path):
    facts = detect_platform(write_root(tmp_path, agx64_files()), gpu=ORIN_GPU_64, machine="aarch64")
    assert facts.is_jetson and facts.unified_memory and facts.device == "cuda"
    assert (facts.l4t_version, facts.jetpack_version) == ("36.4.3", "6.2")
    assert facts.module == "agx-orin-64gb" and facts.module_name == "Jetson AGX Orin 64GB"
    assert facts.bandwidth_gbps == 204.8
    assert facts.mem_total_bytes == 64335836 * 1024 and facts.mem_available_bytes == 60123548 * 1024
    assert facts.swap_total_bytes == 32167904 * 1024
    assert (facts.power_mode_id, facts.power_mode_name) == (0, "MAXN")
    assert describe(facts) == "Jetson AGX Orin 64GB (L4T 36.4.3, JetPack 6.2), aarch64"
    defaults = platform_defaults(facts)
    assert defaults["mem_fraction_static"] == 0.8 and defaults["cuda_graph_max_bs"] <= 32
    assert defaults["chunked_prefill_size"] == 2048
    warnings = platform_warnings(facts)
    assert len(warnings) == 1 and "zram" in warnings[0]
    json.dumps(facts.to_dict())  # serializable for --json


def test_power_mode_and_swap_warnings(tmp_path):
    facts = detect_platform(write_root(tmp_path, agx64_files("pmode:0003\n", swaps="Filename Type\n")),
                            gpu=ORIN_GPU_64, machine="aarch64")
    warnings = platform_warnings(facts)
    assert any("MODE_50W" in w and "nvpmodel -m 0" in w and "MAXN" in w for w in warnings)
    facts.swap_total_bytes, facts.swap_devices = 0, []
    assert any(w.startswith("swap is off") for w in platform_warnings(facts))


def test_orin_nano_super(tmp_path):
    root = write_root(tmp_path, {
        "/etc/nv_tegra_release": TEGRA_R36_4_3,
        "/proc/device-tree/model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00",
        "/proc/device-tree/compatible": "nvidia,p3768-0000+p3767-0005-super\x00nvidia,p3767-0005\x00"
                                        "nvidia,tegra234\x00",
        "/proc/meminfo": MEMINFO_NANO8, "/proc/swaps": SWAPS_NVME,
        "/etc/nvpmodel.conf": NVPMODEL_NANO_SUPER, "/var/lib/nvpmodel/status": "pmode:0002\n",
    })
    facts = detect_platform(root, gpu=ORIN_GPU_8, machine="aarch64")
    assert facts.module == "orin-nano-8gb" and facts.super_mode
    assert facts.bandwidth_gbps == 102.0
    assert platform_warnings(facts) == []
    assert platform_defaults(facts)["max_running_requests"] == 8
    facts.power_mode_id, facts.power_mode_name = 0, "15W"
    assert facts.bandwidth_gbps == 68.0
    assert any("nvpmodel -m 2" in w and "MAXN_SUPER" in w for w in platform_warnings(facts))


def test_in_container_model_copy_and_no_tegra_release(tmp_path):
    """Docker hides /proc/device-tree; jetson-containers mounts a copy at /tmp/nv_jetson_model."""
    root = write_root(tmp_path, {"/tmp/nv_jetson_model": "NVIDIA Jetson AGX Orin Developer Kit",
                                 "/proc/meminfo": MEMINFO_AGX32})
    facts = detect_platform(root, gpu=GpuInfo("Orin", (8, 7), 31919604 * 1024, 14, True), machine="aarch64")
    assert facts.is_jetson and facts.module == "agx-orin-32gb" and facts.l4t_version is None
    warnings = platform_warnings(facts)
    assert any("swap is off" in w for w in warnings)
    assert any("nv_tegra_release" in w for w in warnings)
    assert any("power mode unknown" in w for w in warnings)


def test_l4t_from_dpkg_status(tmp_path):
    root = write_root(tmp_path, {
        "/var/lib/dpkg/status": "Package: bash\nVersion: 5.1\n\nPackage: nvidia-l4t-core\nStatus: install ok "
                                "installed\nArchitecture: arm64\nVersion: 36.4.3-20250107174145\n\n",
        "/proc/meminfo": MEMINFO_AGX64})
    facts = detect_platform(root, gpu=ORIN_GPU_64, machine="aarch64")
    assert facts.l4t_version == "36.4.3" and facts.module == "agx-orin-64gb"  # from the SM count


def test_nx8_and_nano8_cannot_be_told_apart_by_gpu(tmp_path):
    root = write_root(tmp_path, {"/etc/nv_tegra_release": TEGRA_R36_4_3, "/proc/meminfo": MEMINFO_NANO8})
    facts = detect_platform(root, gpu=ORIN_GPU_8, machine="aarch64")
    assert facts.is_jetson and facts.module is None and facts.bandwidth_gbps is None
    assert any("nv_jetson_model" in w for w in platform_warnings(facts))


def test_jetpack5_and_cpu_torch_on_jetson(tmp_path):
    files = agx64_files()
    files["/etc/nv_tegra_release"] = TEGRA_R35_4_1
    facts = detect_platform(write_root(tmp_path, files), gpu=None, machine="aarch64")
    assert facts.is_jetson and facts.jetpack_version == "5.1.2" and facts.device == "cpu"
    warnings = platform_warnings(facts)
    assert any("needs JetPack 6" in w for w in warnings)
    assert any("torch sees no CUDA" in w and "jetson-ai-lab" in w for w in warnings)


def test_discrete_gpu_and_cpu(tmp_path):
    root = write_root(tmp_path, {"/proc/meminfo": MEMINFO_AGX64})
    gpu_facts = detect_platform(root, gpu=H100, machine="x86_64")
    assert not gpu_facts.is_jetson and not gpu_facts.unified_memory and gpu_facts.module is None
    assert platform_defaults(gpu_facts) == {"mem_fraction_static": 0.85}
    assert platform_warnings(gpu_facts) == []
    cpu_facts = detect_platform(root, gpu=None, machine="x86_64")
    assert cpu_facts.device == "cpu" and describe(cpu_facts) == "CPU only, x86_64"
    assert platform_defaults(cpu_facts) == {"mem_fraction_static": 0.3}


def test_other_integrated_arm_gpu_is_not_a_jetson(tmp_path):
    root = write_root(tmp_path, {"/proc/meminfo": MEMINFO_AGX64})
    spark = detect_platform(root, gpu=GpuInfo("NVIDIA GB10", (12, 1), 119 * GB, 48, True), machine="aarch64")
    assert not spark.is_jetson and spark.unified_memory and spark.module is None
    assert platform_defaults(spark) == {"mem_fraction_static": 0.8}


def test_thor_is_a_jetson_but_not_an_orin(tmp_path):
    root = write_root(tmp_path, {"/proc/meminfo": MEMINFO_AGX64})
    thor = detect_platform(root, gpu=GpuInfo("NVIDIA Thor", (11, 0), 122 * GB, 20, True), machine="aarch64")
    assert thor.is_jetson and thor.module is None and thor.bandwidth_gbps is None


def test_this_machine():
    facts = detect_platform()
    assert facts.mem_total_bytes > 0 and facts.arch
    platform_warnings(facts)


def test_decode_bound():
    from edgelm.model_executor.weight_bytes import decode_read_bytes

    llama = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
    # int4wo-128 weights are 5.81e9 bytes, of which a step reads all but the 1.05e9 embedding table
    read = decode_read_bytes(llama, "half", "int4wo-128")
    assert read == 5_809_643_520 - 128256 * 4096 * 2
    assert decode_tokens_per_s_bound(204.8, read) == pytest.approx(43.0, abs=0.1)  # AGX Orin
    assert decode_read_bytes({**llama, "tie_word_embeddings": True}, "half") == 16_060_522_496 - 128256 * 4096 * 2
    # --quantize-lm-head int8: the head's 2 bytes a weight become 1 plus a float32 scale a row
    head8 = decode_read_bytes(llama, "half", "int4wo-128", lm_head_quant="int8")
    assert read - head8 == 128256 * 4096 - 128256 * 4
    tied = {**llama, "tie_word_embeddings": True}  # tied: one int8 table for both, read once as the head
    assert decode_read_bytes(tied, "half", "int4wo-128", lm_head_quant="int8") == head8


def test_check_env_cpu_text_and_json(capsys):
    assert check_env.main([]) == 0
    text = capsys.readouterr().out
    for word in ("platform", "torch", "torch_native", "torchao-config", "attention backends"):
        assert word in text
    assert check_env.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention_backends"]["torch_native"]["ok"] is True
    assert "flashinfer" in report["versions"]
    assert isinstance(report["warnings"], list)


def test_check_env_on_recorded_jetson(tmp_path, capsys, monkeypatch):
    root = write_root(tmp_path, agx64_files("pmode:0001\n"))
    monkeypatch.setattr(check_env, "_probe_gpu", lambda: ORIN_GPU_64)
    versions = {**check_env.library_versions(), "triton": "3.3.0", "torchao": "0.11.0"}  # a Jetson image's
    monkeypatch.setattr(check_env, "library_versions", lambda: versions)
    assert check_env.main(["--root", root, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"]["module"] == "agx-orin-64gb"
    assert "fp8wo" not in report["torchao_configs"]["runnable"]  # SM 8.7 has no FP8
    assert "int4wo-128" in report["torchao_configs"]["runnable"]
    assert report["decode_bound_tok_s"]["Llama-3.1-8B int4wo-128"] == pytest.approx(43.0, abs=0.1)
    assert report["decode_bound_tok_s"]["Llama-3.1-8B int4wo-128 + int8 head"] == pytest.approx(
        204.8e9 / (5_809_643_520 - 128256 * 4096 * 2 - 128256 * 4096 + 128256 * 4), abs=0.1)
    assert any("MODE_15W" in w for w in report["warnings"])
    assert report["defaults"]["chunked_prefill_size"] == 2048


@pytest.mark.skipif(not os.path.exists("/etc/nv_tegra_release"), reason="not a Jetson")
def test_real_jetson():
    facts = detect_platform()
    assert facts.is_jetson and facts.l4t_version
