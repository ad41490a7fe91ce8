"""The int4 kernels' inline-PTX paths (tensor-core tc/tcw, packed-16-bit gemv_h2) compiled for real
GPUs, here without one.

The interpreter runs the kernels' plain-op path only; Triton's wheel ships ptxas, so the PTX path can
still be compiled (to SASS) for Ampere (SM 8.0), Jetson Orin (SM 8.7) and Hopper (SM 9.0) in CI:
a PTX typo or an instruction a target lacks fails here, not on a user's GPU. On SM 9.0 they compile
with programmatic dependent launch (triton_ops.pdl), as the H100 runs them. The compiles run in a
child process: this test session runs Triton in interpreter mode (conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(code: str, *args, skip_without_ptxas: bool = False) -> list:
    """Run a compile script in a child process without the interpreter; its "RESULT <json>" line, parsed.
    skip_without_ptxas: a child that died because this triton has no ptxas skips the test."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code, *(json.dumps(a) for a in args)], capture_output=True,
                          text=True, env=env, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None and skip_without_ptxas and "ptxas" in proc.stderr:
        pytest.skip("this triton has no ptxas to compile with")
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])
CASES = [  # (capability, WEIGHTS, bf16, BLOCK_N, SPLIT_K[, ONE_ROW])
    (87, True, False, 64, 4),  # Jetson Orin, --dtype half: tcw
    (87, False, True, 64, 1),
    (80, True, True, 128, 8),
    (90, True, True, 128, 8),  # Hopper: wgmma with the weights from registers
    (90, False, False, 64, 4),
    (90, True, True, 128, 8, True),  # ONE_ROW: M = 1 reads x once per block
    (87, True, False, 64, 4, True),
]
# gemv_h2: (capability, bf16, SPLIT_K, PREFETCH[, PDL 3: release late])
H2_CASES = [(87, False, 1, 0), (90, True, 4, 0), (80, True, 1, 0), (90, True, 1, 1), (87, True, 2, 1), (90, True, 1, 2),
            (90, False, 2, 2), (87, True, 1, 2), (90, True, 1, 2, 3), (87, True, 1, 3), (90, True, 1, 3), (90, False, 2, 4),
            (87, False, 1, 4)]
# gemv_h2 reading Int4Weight.meta (int4_meta_pairs; s_ptr = m_ptr int32): (capability, bf16, PREFETCH, META)
H2_META_CASES = [(87, True, 3, 2), (90, True, 3, 1), (90, False, 2, 2), (80, True, 0, 1)]
# gemv_h2's K loop software-pipelined (config[7] STAGES, PREFETCH 0): (capability, bf16, STAGES)
H2_STAGE_CASES = [(87, True, 3), (90, False, 2), (80, True, 4)]
# gemv_h2 on prepared x (PREP; the prep kernel and the PREP norm and SiLU·mul compiled too):
# (capability, bf16, SPLIT_K, PREFETCH, PREP form)
H2_PREP_CASES = [(87, False, 1, 0, 2), (87, True, 2, 1, 1), (80, True, 1, 0, 2), (90, True, 1, 2, 1), (90, False, 4, 1, 2),
                 (90, True, 1, 2, 2)]
# the fused decoder layer's gemv_h2 (SPLIT_K 1): (capability, bf16, PREFETCH, NORM, EPILOGUE; 3: rotary + KV write)
H2_FUSED_CASES = [(87, False, 0, True, 0), (87, True, 2, False, 1), (90, True, 2, True, 0), (90, True, 0, True, 2),
                  (90, False, 1, False, 1), (80, True, 1, True, 2), (90, True, 2, True, 3), (87, False, 0, True, 3)]
CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edgelm.layers.triton_ops import rmsnorm, silu_mul, xprep
from edgelm.quantization import int4_ptx, int4_tc

TC = ["x_ptr", "qw_ptr", "s_ptr", "m_ptr", "bias_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "M", "N", "K", "KW", "NG",
      "stride_xm", "stride_ym", "blocks_per_split"]
H2 = [a for a in TC if a not in ("M", "stride_xm", "stride_ym")] + ["nw_ptr", "eps", "pos_ptr", "cs_ptr", "k_buf_ptr",
                                                                     "v_buf_ptr", "slot_ptr", "q_size", "kv_size",
                                                                     "xs_ptr", "xd_ptr"]
TYPES = {"qw_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "eps": "fp32",
         "pos_ptr": "*i64", "cs_ptr": "*fp32", "slot_ptr": "*i64", "xs_ptr": "*fp32", "xd_ptr": "*fp32"}


def compile_case(fn, args, bf16, cap, const, need_prmt, types=None):
    act = "*bf16" if bf16 else "*fp16"
    sig = {a: {**TYPES, **(types or {})}.get(a, act if a.endswith("_ptr") else "i32") for a in args}
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 4})
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = c.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    release = ptx.find("griddepcontrol.launch_dependents")
    return {"ok": True, "lop3": "lop3.b32" in ptx and ("prmt.b32" in ptx or not need_prmt),
            "pdl": wait >= 0, "load_before_wait": 0 <= ptx.find("ld.global") < wait,
            "release_after_loop": release > ptx.rfind("lop3.b32"), "release_before_loop": release < ptx.find("lop3.b32"),
            "fma2": "fma.rn.bf16x2" in ptx or "fma.rn.f16x2" in ptx, "cubin": len(c.asm["cubin"]),
            "subnormal_dot": "mul.rn.f16x2" in ptx and "lop3.b32" not in ptx, "cp_async": "cp.async" in ptx}


out = []
for cap, weights, bf16, block_n, split_k, *one_row in json.loads(sys.argv[1]):
    const = {"GROUP": 128, "BLOCK_M": 16, "BLOCK_N": block_n, "SPLIT_K": split_k, "HAS_BIAS": True, "BF16": bf16,
             "USE_ASM": True, "EVEN_K": True, "WEIGHTS": weights, "ONE_ROW": bool(one_row and one_row[0]),
             "PDL": int(cap >= 90)}
    out.append(compile_case(int4_tc._tc_kernel, TC, bf16, cap, const, True))
for cap, bf16, split_k, prefetch, *pdl_mode in json.loads(sys.argv[2]):  # the packed-16-bit GEMV
    const = {"GROUP": 128, "BLOCK_N": 8, "BLOCK_B": 4, "SPLIT_K": split_k, "HAS_BIAS": True, "BF16": bf16,
             "USE_ASM": True, "PDL": pdl_mode[0] if pdl_mode else int(cap >= 90), "PREFETCH": prefetch,
             "NORM": False, "EPILOGUE": 0, "HALF": 1, "PREP": 0,
             "META": 0, "STAGES": 1}
    out.append(compile_case(int4_ptx._gemv_h2_kernel, H2, bf16, cap, const, False))
for cap, bf16, prefetch, norm, epilogue in json.loads(sys.argv[3]):  # its fused forms
    const = {"GROUP": 128, "BLOCK_N": 8, "BLOCK_B": 4, "SPLIT_K": 1, "HAS_BIAS": True, "BF16": bf16, "USE_ASM": True,
             "PDL": int(cap >= 90), "PREFETCH": prefetch, "NORM": norm, "EPILOGUE": epilogue, "HALF": 64, "PREP": 0,
             "META": 0, "STAGES": 1}
    out.append(compile_case(int4_ptx._gemv_h2_kernel, H2, bf16, cap, const, False))
for cap, bf16, split_k, prefetch, form in json.loads(sys.argv[4]):  # on prepared x (int4_xprep), then the prep kernel
    const = {"GROUP": 128, "BLOCK_N": 8, "BLOCK_B": 4, "SPLIT_K": split_k, "HAS_BIAS": True, "BF16": bf16,
             "USE_ASM": True, "PDL": int(cap >= 90), "PREFETCH": prefetch, "NORM": False, "EPILOGUE": 0, "HALF": 1,
             "PREP": form, "META": 0, "STAGES": 1}
    out.append(compile_case(int4_ptx._gemv_h2_kernel, H2, bf16, cap, const, False, {"x_ptr": "*i32"}))
    xp = {"xp_ptr": "*i32"}
    preps = [compile_case(xprep._x_prep_kernel, ["x_ptr", "xp_ptr", "xs_ptr", "xd_ptr", "K", "NB"], bf16, cap,
                          {"BLOCKS": 8, "PDL": 2 * int(cap >= 90)}, False, xp),
             compile_case(rmsnorm._rms_norm_kernel, ["x_ptr", "x_stride", "res_ptr", "res_stride", "w_ptr", "out_ptr",
                          "out_stride", "res_out_ptr", "res_out_stride", "n_cols", "eps", "xp_ptr", "xs_ptr", "xd_ptr"],
                          bf16, cap, {"HAS_RESIDUAL": True, "BLOCK": 4096, "PDL": int(cap >= 90), "PREP": True}, False, xp),
             compile_case(silu_mul._silu_and_mul_kernel, ["x_ptr", "x_stride", "out_ptr", "out_stride", "d", "xp_ptr",
                          "xs_ptr", "xd_ptr"], bf16, cap, {"BLOCK": 1024, "PDL": int(cap >= 90), "PREP": True}, False, xp)]
    out[-1]["prep_ok"] = all(r["ok"] for r in preps)
    out[-1]["prep_error"] = next((r["error"] for r in preps if not r["ok"]), None)
for cap, bf16, prefetch, meta in json.loads(sys.argv[5]):  # scales and offsets paired in one int32
    const = {"GROUP": 128, "BLOCK_N": 8, "BLOCK_B": 4, "SPLIT_K": 1, "HAS_BIAS": True, "BF16": bf16, "USE_ASM": True,
             "PDL": int(cap >= 90), "PREFETCH": prefetch, "NORM": False, "EPILOGUE": 0, "HALF": 1, "PREP": 0,
             "META": meta, "STAGES": 1}
    out.append(compile_case(int4_ptx._gemv_h2_kernel, H2, bf16, cap, const, False, {"s_ptr": "*i32", "m_ptr": "*i32"}))
for cap, bf16, stages in json.loads(sys.argv[6]):  # the K loop pipelined through shared memory
    const = {"GROUP": 128, "BLOCK_N": 16, "BLOCK_B": 8, "SPLIT_K": 1, "HAS_BIAS": True, "BF16": bf16, "USE_ASM": True,
             "PDL": int(cap >= 90), "PREFETCH": 0, "NORM": False, "EPILOGUE": 0, "HALF": 1, "PREP": 0, "META": 0,
             "STAGES": stages}
    out.append(compile_case(int4_ptx._gemv_h2_kernel, H2, bf16, cap, const, False))
print("RESULT " + json.dumps(out))
"""


def test_int4_kernels_compile_for_sm80_sm87_sm90():
    results = run_child(CHILD, CASES, H2_CASES, H2_FUSED_CASES, H2_PREP_CASES, H2_META_CASES, H2_STAGE_CASES)
    if all(not r["ok"] and "ptxas" in r["error"] for r in results):
        pytest.skip("this triton has no ptxas to compile with")
    assert len(results) == (len(CASES) + len(H2_CASES) + len(H2_FUSED_CASES) + len(H2_PREP_CASES)
                            + len(H2_META_CASES) + len(H2_STAGE_CASES))
    for case, r in zip(CASES, results):
        assert r["ok"], (case, r.get("error"))
        assert r["lop3"] and r["cubin"] > 0, case  # the inline PTX made it into the kernel
        assert r["fma2"] == case[1], case  # packed FMAs only on the dequantize-to-weights path
        assert r["pdl"] == (case[0] >= 90), case  # Hopper: compiled with PDL (triton_ops.pdl), never below
    for case, r in zip(H2_CASES, results[len(CASES):]):
        assert r["ok"], (case, r.get("error"))
        assert r["lop3"] and r["fma2"] and r["cubin"] > 0, case
        assert r["pdl"] == (case[0] >= 90), case
        if r["pdl"] and case[3]:  # PREFETCH: the first weights load before the wait, not sunk below it
            assert r["load_before_wait"], case
        if tuple(case[4:]) == (3,):  # release late: after the K loop (its inline PTX)
            assert r["release_after_loop"], case
        elif r["pdl"]:  # PDL 1: released right after the wait, before the K loop
            assert r["release_before_loop"], case
    for case, r in zip(H2_FUSED_CASES, results[len(CASES) + len(H2_CASES):]):
        assert r["ok"], (case, r.get("error"))
        assert r["lop3"] and r["fma2"] and r["cubin"] > 0, case
        assert r["pdl"] == (case[0] >= 90), case
        if r["pdl"] and case[2]:
            assert r["load_before_wait"], case
    for case, r in zip(H2_PREP_CASES, results[len(CASES) + len(H2_CASES) + len(H2_FUSED_CASES):]):
        assert r["ok"] and r["prep_ok"], (case, r.get("error"), r.get("prep_error"))
        assert r["subnormal_dot"] and r["fma2"] and r["cubin"] > 0, case  # the and/FMA dot, no code base
        assert r["pdl"] == (case[0] >= 90), case
        if r["pdl"] and case[3]:
            assert r["load_before_wait"], case
    for case, r in zip(H2_STAGE_CASES, results[-len(H2_STAGE_CASES):]):
        assert r["ok"], (case, r.get("error"))
        assert r["lop3"] and r["fma2"] and r["cp_async"], case  # the weight tiles through cp.async
    for case, r in zip(H2_META_CASES, results[-len(H2_META_CASES) - len(H2_STAGE_CASES):-len(H2_STAGE_CASES)]):
        assert r["ok"], (case, r.get("error"))
        assert r["lop3"] and r["fma2"] and r["cubin"] > 0, case
        assert r["pdl"] == (case[0] >= 90), case
        if r["pdl"] and case[2]:
            assert r["load_before_wait"], case


GEMV_CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edgelm.layers.triton_ops import gemv

ARGS = ["x_ptr", "x_stride", "w_ptr", "w_stride", "b_ptr", "out_ptr", "out_stride", "M", "N", "K", "norm_w_ptr",
        "ss_in_ptr", "ss_in_count", "ss_out_ptr", "eps"]
out = []
for cap, pdl in json.loads(sys.argv[1]):
    sig = {a: "*bf16" if a.endswith("_ptr") else ("fp32" if a == "eps" else "i32") for a in ARGS}
    sig["ss_in_ptr"] = sig["ss_out_ptr"] = "*fp32"
    const = dict(HAS_BIAS=False, USE_DOT=False, BLOCK_M=1, BLOCK_N=4, BLOCK_K=2048, EVEN_K=True, INTERPRET=False,
                 PROLOGUE=0, RESIDUAL=False, BLOCK_P=2, PDL=pdl)
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    aligned = [a for a in names if a.endswith("_ptr") or a.endswith("stride") or a in ("N", "K")]
    src = ASTSource(fn=gemv._skinny_gemm_kernel, signature=sig,
                    constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    opts = {"num_warps": 4, "num_stages": 3}
    if pdl:
        opts["launch_pdl"] = True
    ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts).asm["ptx"]
    lines = ptx.splitlines()
    wait = next((i for i, ln in enumerate(lines) if "griddepcontrol.wait" in ln), None)
    first_load = next((i for i, ln in enumerate(lines) if "ld.global" in ln), None)
    out.append({"wait": wait, "first_load": first_load})
print("RESULT " + json.dumps(out))
"""


def test_skinny_gemm_pdl_prefetches_weights_before_the_wait():
    """Compiled for Hopper with PDL, the batch-1 GEMV issues its first weight loads before
    griddepcontrol.wait (they overlap the previous kernel); for Orin it has no wait at all."""
    from edgelm.layers.triton_ops import pdl

    if not pdl._TRITON_OK:
        pytest.skip("this triton cannot launch with PDL")
    hopper, orin = run_child(GEMV_CHILD, [[90, 1], [87, 0]])
    assert hopper["wait"] is not None and hopper["first_load"] is not None
    assert hopper["first_load"] < hopper["wait"]
    assert orin["wait"] is None and orin["first_load"] is not None


ATTN_CHILD = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

da = importlib.import_module("edgelm.layers.attention.triton_ops.decode_attention")
ARGS = ["Q", "K_buf", "V_buf", "req_to_token", "req_pool_indices", "seq_lens", "Mid_O", "Mid_LSE", "Out", "Counter",
        "qk_scale", "num_splits", "stride_qb", "stride_qh", "stride_kbs", "stride_kbh", "stride_vbs", "stride_vbh",
        "stride_r2t", "stride_mob", "stride_moh", "stride_mos", "stride_mlb", "stride_mlh", "stride_ob", "stride_oh",
        "PF0", "PF0_N", "PF1", "PF1_N"]
TYPES = {"Q": "*bf16", "K_buf": "*bf16", "V_buf": "*bf16", "req_to_token": "*i32", "req_pool_indices": "*i64",
         "seq_lens": "*i32", "Mid_O": "*fp32", "Mid_LSE": "*fp32", "Out": "*bf16", "Counter": "*i32", "qk_scale": "fp32",
         "PF0": "*u8", "PF1": "*u8"}
out = []
for cap, prefetch, l2pf, *merge in json.loads(sys.argv[1]):
    sig = {a: TYPES.get(a, "i32") for a in ARGS}
    const = dict(GROUP=4, HEADS=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_H=16, BLOCK_N=64, MIN_SPLIT=64, PRECISION="tf32",
                 DIRECT=False, MERGE=bool(merge), MAX_SPLITS=16, PDL=2 if cap >= 90 else 0, PREFETCH_KV=prefetch,
                 L2PF=l2pf, MERGE_HEADS=merge[0] if merge else 1)
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    src = ASTSource(fn=da._decode_partial_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 4, "num_stages": 2}).asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    out.append({"wait": wait, "loads_before_wait": ptx[:wait].count("ld.global") if wait >= 0 else None,
                "l2_prefetches": ptx.count("prefetch.global.L2"), "first_l2_prefetch": ptx.find("prefetch.global.L2"),
                "atomics": ptx.count("atom.")})
MERGE_ARGS = ["Mid_O", "Mid_LSE", "Out", "seq_lens", "num_splits", "stride_mob", "stride_moh", "stride_mos",
              "stride_mlb", "stride_mlh", "stride_ob", "stride_oh"]
for cap, max_splits in json.loads(sys.argv[2]):  # the second kernel's merge, all splits in one load
    sig = {a: TYPES.get(a, "i32") for a in MERGE_ARGS}
    const = dict(HEAD_DIM=128, BLOCK_D=128, MIN_SPLIT=64, ALIGN=64, PDL=2 if cap >= 90 else 0, MAX_SPLITS=max_splits)
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    src = ASTSource(fn=da._decode_merge_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 2}).asm["ptx"]
    out.append({"merge_loads": ptx.count("ld.global"), "loop": "bra" in ptx})
print("RESULT " + json.dumps(out))
"""


def test_decode_attention_prefetch_kv_loads_before_the_wait():
    """DecodeConfig.prefetch_kv: compiled for Hopper with PDL, the split's first K/V block is loaded
    before griddepcontrol.wait; without it nothing is; for Orin (no PDL) it compiles without a wait.
    L2PF (triton_ops "l2_prefetch"): the weights' L2 prefetches are in the PTX, on Hopper before the wait.
    MERGE with MERGE_HEADS: the in-kernel merge of several heads a load compiles for Hopper and Orin; so does the
    second kernel's merge (all splits in one load, no loop)."""
    (hopper, hopper_off, orin, hopper_pf, orin_pf, hopper_merge, orin_merge, vec90, vec87) = run_child(
        ATTN_CHILD, [[90, True, False], [90, False, False], [87, True, False], [90, True, True], [87, False, True],
                     [90, True, False, 4], [87, True, False, 2]], [[90, 16], [87, 64]], skip_without_ptxas=True)
    assert hopper["wait"] >= 0 and hopper["loads_before_wait"] > 0
    assert hopper_off["wait"] >= 0 and hopper_off["loads_before_wait"] == 0
    assert orin["wait"] == -1
    assert hopper["l2_prefetches"] == orin["l2_prefetches"] == 0
    assert hopper_pf["l2_prefetches"] >= 2 and 0 <= hopper_pf["first_l2_prefetch"] < hopper_pf["wait"]
    assert orin_pf["l2_prefetches"] >= 2 and orin_pf["wait"] == -1
    # the in-kernel merge (its heads read 4 / 2 at a time) compiles for both, with its arrival counter
    assert hopper["atomics"] == 0 and hopper_merge["atomics"] >= 2 and orin_merge["atomics"] >= 2
    # the second kernel's merge compiles for both without a loop over the splits
    assert not vec90["loop"] and not vec87["loop"] and vec90["merge_loads"] >= 2


PERSIST_CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edgelm.quantization import int4_ptx

ARGS = ["x_ptr", "qw_ptr", "s_ptr", "m_ptr", "bias_ptr", "y_ptr", "N", "K", "KW", "NG", "tiles"]
TYPES = {"qw_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16"}
out = []
for cap, pdl_mode in json.loads(sys.argv[1]):
    sig = {a: TYPES.get(a, "*bf16" if a.endswith("_ptr") else "i32") for a in ARGS}
    const = {"GROUP": 128, "BLOCK_N": 16, "BLOCK_B": 8, "HAS_BIAS": False, "BF16": True, "USE_ASM": True, "PDL": pdl_mode}
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    src = ASTSource(fn=int4_ptx._gemv_h2_persistent_kernel, signature=sig,
                    constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in ARGS})
    ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 4}).asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    out.append({"wait": wait, "load_before_wait": 0 <= ptx.find("ld.global") < wait, "fma2": "fma.rn.bf16x2" in ptx})
print("RESULT " + json.dumps(out))
"""


def test_gemv_h2_persistent_compiles_for_sm87_sm90():
    """The persistent gemv_h2 (config[6]) compiles for Orin without PDL and for Hopper with it, its
    first weights loaded before the wait."""
    hopper, hopper_late, orin = run_child(PERSIST_CHILD, [[90, 1], [90, 3], [87, 0]], skip_without_ptxas=True)
    assert hopper["load_before_wait"] and hopper_late["load_before_wait"] and hopper["fma2"]
    assert orin["wait"] == -1 and orin["fma2"]



HEAD_CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edgelm.quantization import int8_head as h


def compile_case(fn, sig, const, cap):
    names = list(sig) + list(const)
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}},
                    constexprs={(names.index(k),): v for k, v in const.items()})
    opts = {"num_warps": 4, "num_stages": 3}
    if const["PDL"]:
        opts["launch_pdl"] = True
    try:
        c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = c.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    return {"ok": True, "prmt": ptx.count("prmt.b32"), "cvt_s8": "cvt.rn.f32.s8" in ptx, "mma": "mma" in ptx,
            "pdl": wait >= 0, "load_before_wait": 0 <= ptx.find("ld.global") < wait, "cubin": len(c.asm["cubin"])}


out = []
magic = {"x_ptr": "*bf16", "q_ptr": "*i32", "q_stride": "i32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32",
         "W": "i32"}
plain = {"x_ptr": "*fp16", "x_stride": "i32", "q_ptr": "*i8", "q_stride": "i32", "scale_ptr": "*fp32", "out_ptr": "*fp32",
         "out_stride": "i32", "M": "i32", "N": "i32", "K": "i32"}
for cap, form in json.loads(sys.argv[1]):
    pdl = int(cap >= 90)
    if form == "magic":
        out.append(compile_case(h._int8_head_magic_kernel, magic,
                                {"BLOCK_N": 8, "BLOCK_W": 128, "USE_ASM": True, "PDL": pdl}, cap))
    else:
        dot = form.startswith("dot")
        sig = {**plain, "x_ptr": "*fp32"} if form == "dot32" else plain  # a float32 model: an ieee dot
        out.append(compile_case(h._int8_head_kernel, sig,
                                {"BLOCK_M": 16 if dot else 1, "BLOCK_N": 64 if dot else 8, "BLOCK_K": 128 if dot else 512,
                                 "EVEN_K": True, "FORM": h.FORMS.index(form[:3] if dot else form), "INTERPRET": False,
                                 "PDL": pdl}, cap))
print("RESULT " + json.dumps(out))
"""
HEAD_CASES = [(87, "magic"), (80, "magic"), (90, "magic"), (87, "dot"), (90, "dot"), (87, "acc"), (90, "reduce"),
              (87, "dot32")]


def test_int8_head_kernels_compile_for_sm80_sm87_sm90():
    """--quantize-lm-head int8's kernels: the one-row form's bytes made floats by PRMT (its inline PTX there, no
    int8 conversion instruction), the dot form on tensor cores, PDL (weights loaded before the wait) on SM 9.0 only."""
    results = run_child(HEAD_CHILD, HEAD_CASES, skip_without_ptxas=True)
    if all(not r["ok"] and "ptxas" in r["error"] for r in results):
        pytest.skip("this triton has no ptxas to compile with")
    for case, r in zip(HEAD_CASES, results, strict=True):
        assert r["ok"], (case, r.get("error"))
        assert r["cubin"] > 0 and r["pdl"] == (case[0] >= 90), case
        if r["pdl"]:
            assert r["load_before_wait"], case
        if case[1] == "magic":
            assert r["prmt"] >= 4 and not r["cvt_s8"], case
        assert r["mma"] == (case[1] == "dot"), case  # float32 (dot32): an ieee dot on FMAs, no tf32 mma
