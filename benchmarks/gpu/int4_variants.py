"""Batch-1 int4wo decode step time of the M = 1 int4 kernel choices, per weight shape, on one loaded
model: each variant replaces one shape's batch-1 entry of int4_kernels.SHAPE_DISPATCH, recaptures the
CUDA graphs and times bench_one_batch's overlapped decode loop (median inter-token latency), as
decode_variants.py does for the bf16 GEMVs. Why in a whole step: with PDL a kernel's programs start
while the one before finishes, so a launch config's cost in a step is not its time alone (the bf16
sweep's winners differed from the isolated ones). The shipped tables run first, in the middle and
last, so drift shows; then the per-shape winners (each > 5 us better than the median baseline) run
together twice around one more baseline, and their tables are written in load_dispatch's format
(--dispatch-out) so that EDGELM_INT4_DISPATCH=file runs them in any later command. The shapes are
the loaded model's (the first layer's qkv/o/gate_up/down); --candidates round1|...|round24|all (or a
comma-separated list; none: only the shipped tables) picks the configs tried (all: every round, for a GPU or model not swept yet, e.g. a
Jetson with its own model). --ablate-gemv adds one run of the shipped step with every int4 GEMV launching
nothing: the step minus it is what the int4 GEMVs cost inside the step. --ablate-ops rmsnorm,silu,merge: the
same for each of those small kernels (both RMSNorms, SiLU·mul, the decode attention's merge), alone and then
together, each followed by a shipped run: at most what fusing it into a neighbour could save (both runs with
the token ids clamped into the vocabulary, one small kernel: an ablated step's logits are garbage). --ops-ab OP[,OP..] adds the shipped
tables with each triton_ops switch on, off, on (then all together, then off) after the sweep: e.g. int4_xprep
(x prepared for the GEMVs), int4_rope (the rotary + KV write in qkv_proj's gemv_h2), fused_int4 (the whole
decoder layer fused), l2_prefetch (l2_prefetch@MB: with that byte budget a layer), int4_meta_pairs (each
group's scale and offset read as one int32); -OP turns a switch that is on off instead (e.g. -int4_rope:
qkv_proj's rotary epilogue, gemv_h2's or cuda_w4's, against the separate launch); --fused-ab is --ops-ab
int4_rope,fused_int4. --env-ab "VAR=value[;VAR=value]": the same with an environment variable set, e.g.
EDGELM_DECODE_CONFIG=min_split_len=128 (read when the attention backend is made, as each run does).

    python benchmarks/gpu/int4_variants.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --torchao-config int4wo-128 --batch-size 1 --input-len 1024 --output-len 64 \
        --out $OUT/int4_variants.json --dispatch-out $OUT/int4_dispatch_step.json
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgelm import bench_one_batch  # noqa: E402
from edgelm.bench_utils import write_json  # noqa: E402
from edgelm.model_config import ModelConfig  # noqa: E402
from edgelm.model_executor.model_runner import ModelRunner  # noqa: E402
from edgelm.model_loader.resolve import resolve_model  # noqa: E402
from edgelm.quantization import int4_kernels  # noqa: E402

# the linears swept, by module name; their shapes (N, K) are the loaded model's (model_shapes). The rounds
# below were chosen for Llama-3.1-8B: qkv (6144, 4096), o (4096, 4096), gate_up (28672, 4096), down (4096, 14336)
ROLES = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"}
# round 1: neighbours of the isolated sweep's picks (int4_tune_h100.json): narrower and wider row tiles, more
# blocks a load, split K for the short shapes; gemv_h2 (BLOCK_N, BLOCK_B, SPLIT_K, num_warps),
# tcw (BLOCK_N, SPLIT_K, num_warps)
ROUND1: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (4, 8, 1, 4)), ("gemv_h2", (8, 8, 2, 4)), ("gemv_h2", (4, 8, 2, 4)),
            ("gemv_h2", (8, 16, 1, 4)), ("gemv_h2", (8, 4, 1, 4))],
    "o": [("gemv_h2", (8, 8, 1, 4)), ("gemv_h2", (4, 8, 2, 4)), ("gemv_h2", (4, 8, 4, 4)),
          ("gemv_h2", (2, 8, 1, 2)), ("gemv_h2", (4, 4, 1, 4))],
    "gate_up": [("gemv_h2", (8, 16, 1, 4)), ("gemv_h2", (16, 8, 1, 4)), ("gemv_h2", (8, 8, 1, 8)),
                ("gemv_h2", (4, 8, 1, 4)), ("gemv_h2", (8, 4, 1, 4))],
    "down": [("gemv_h2", (8, 8, 1, 4)), ("gemv_h2", (4, 8, 1, 4)), ("gemv_h2", (8, 8, 2, 4)),
             ("gemv_h2", (8, 16, 1, 4)), ("tcw", (64, 8, 4)), ("tcw", (128, 4, 8)), ("tcw", (128, 16, 8))],
}

# round 2, around round 1's winners (now the shipped tables): wider still. A thread of gemv_h2 holds 4 words of
# each of several rows at the same inputs, so the x pairs it loads and packs serve all those rows: (4, 8, 1, 4)
# gives a thread 1 row, (8, 8, 1, 4) 2, round 1's winners (8, 16) and (16, 8) 4, (16, 16) and (32, 8) 8. The
# static count of the K loop's SASS per weight (benchmarks/sass_loop_stats.py --h2-configs, no GPU; the H100
# can issue ~4.8 a weight at full bandwidth) falls with it: 6.12, 4.53, 3.80 / 3.59, 3.23 / 3.10. Configs whose
# count stayed above ~4.2 or that spilled were left out.
CANDIDATES: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (16, 16, 1, 4)), ("gemv_h2", (16, 8, 1, 4)), ("gemv_h2", (16, 16, 1, 8)),
            ("gemv_h2", (8, 32, 1, 4))],
    "o": [("gemv_h2", (16, 8, 1, 4)), ("gemv_h2", (8, 16, 1, 4)), ("gemv_h2", (8, 8, 1, 4))],
    "gate_up": [("gemv_h2", (16, 16, 1, 4)), ("gemv_h2", (32, 8, 1, 4)), ("gemv_h2", (32, 16, 1, 4)),
                ("gemv_h2", (16, 16, 1, 8))],
    "down": [("gemv_h2", (16, 16, 1, 4)), ("gemv_h2", (8, 32, 1, 4)), ("gemv_h2", (16, 8, 1, 4)),
             ("gemv_h2", (16, 16, 1, 8))],
}
# round 3: the same idea with 2 warps a program (more programs, as many rows a thread) and split K where
# the rows are few; and the next tile loaded ahead (config[4] = 1: the first one before the PDL wait) on the
# shipped tiles of the short GEMVs (with the tiles before round 1 it changed nothing: 3.16 = 3.16 ms).
ROUND3: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (16, 8, 1, 2)), ("gemv_h2", (16, 16, 2, 4)), ("gemv_h2", (8, 16, 1, 4, 1))],
    "o": [("gemv_h2", (8, 8, 1, 2)), ("gemv_h2", (8, 16, 1, 2)), ("gemv_h2", (16, 8, 2, 4)),
          ("gemv_h2", (16, 16, 2, 4)), ("gemv_h2", (4, 8, 1, 4, 1))],
    "gate_up": [("gemv_h2", (32, 8, 1, 2)), ("gemv_h2", (16, 8, 1, 2))],
    "down": [("gemv_h2", (32, 8, 2, 4)), ("gemv_h2", (16, 16, 2, 4)), ("gemv_h2", (16, 8, 2, 4)),
             ("gemv_h2", (8, 16, 1, 4, 1))],
}

# round 4, after rounds 2-3 (shipped: o (8, 16), down (8, 16) ahead): the next tile ahead where the K loop
# runs several times (gate_up (16, 8) and (8, 8): 4; qkv (8, 8): 4), on o's new tile, and for down on others
ROUND4: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 8, 1, 4, 1)), ("gemv_h2", (16, 8, 1, 4, 1))],
    "o": [("gemv_h2", (8, 16, 1, 4, 1)), ("gemv_h2", (8, 8, 1, 4, 1))],
    "gate_up": [("gemv_h2", (16, 8, 1, 4, 1)), ("gemv_h2", (8, 8, 1, 4, 1)), ("gemv_h2", (16, 4, 1, 4, 1)),
                ("gemv_h2", (8, 16, 1, 4, 1))],
    "down": [("gemv_h2", (8, 8, 1, 4, 1)), ("gemv_h2", (16, 8, 1, 4, 1)), ("gemv_h2", (8, 16, 2, 4, 1))],
}

# round 5: only the first tile loaded before the PDL wait (config[4] = 2), as the bf16 GEMV does: the weight
# stream starts early without round 3-4's second tile of registers (which cost qkv and gate_up programs an SM)
ROUND5: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 16, 1, 4, 2)), ("gemv_h2", (16, 8, 1, 4, 2))],
    "o": [("gemv_h2", (8, 16, 1, 4, 2)), ("gemv_h2", (8, 8, 1, 4, 2))],
    "gate_up": [("gemv_h2", (16, 8, 1, 4, 2)), ("gemv_h2", (8, 16, 1, 4, 2)), ("gemv_h2", (8, 8, 1, 4, 2))],
    "down": [("gemv_h2", (8, 16, 1, 4, 2)), ("gemv_h2", (16, 8, 1, 4, 2))],
}

# round 6: the shipped configs with the next kernel released only after this GEMV's loads (config[5] = 1,
# PDL 3) instead of right after its wait: the kernels after it (launched early with PDL) then do not take SM
# slots from its later programs; not yet run on a GPU
ROUND6: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 16, 1, 4, 2, 1))],
    "o": [("gemv_h2", (8, 16, 1, 4, 1, 1))],
    "gate_up": [("gemv_h2", (16, 8, 1, 4, 0, 1)), ("gemv_h2", (16, 8, 1, 4, 2, 1))],
    "down": [("gemv_h2", (8, 16, 1, 4, 1, 1))],
}

# round 7: the persistent gemv_h2 (config[6] = programs an SM, each program summing several row tiles and
# loading the next tile's first block before storing the last; registers allow 5 a SM at (16, 8) and (8, 16),
# 7 at (8, 8) on SM 9.0); for gate_up's 1792 row tiles of 16 above all; not yet run on a GPU
ROUND7: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 16, 1, 4, 0, 0, 5))],
    "gate_up": [("gemv_h2", (16, 8, 1, 4, 0, 0, 5)), ("gemv_h2", (16, 8, 1, 4, 0, 0, 4)),
                ("gemv_h2", (8, 8, 1, 4, 0, 0, 7)), ("gemv_h2", (16, 8, 1, 4, 0, 1, 5))],
    "down": [("gemv_h2", (4, 16, 1, 4, 0, 0, 6))],
}

# round 8: the shipped configs with x loaded a tile ahead as well (PREFETCH 3: and the weights; 4: the first
# weight tile before the PDL wait, as 2): Nsight Compute put most warp stalls on the x loads' first uses
# (benchmarks/gpu/ncu_run.sh, 2026-12-07); not yet run on a GPU
ROUND8: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 16, 1, 4, 4)), ("gemv_h2", (8, 16, 1, 4, 3))],
    "o": [("gemv_h2", (8, 16, 1, 4, 3)), ("gemv_h2", (8, 16, 1, 4, 4))],
    "gate_up": [("gemv_h2", (16, 8, 1, 4, 4)), ("gemv_h2", (16, 8, 1, 4, 3))],
    "down": [("gemv_h2", (8, 16, 1, 4, 3)), ("gemv_h2", (8, 16, 1, 4, 4))],
}

# round 9: x a tile ahead (PREFETCH 3 / 4) with fewer words a thread than the shipped tiles (narrower rows, or 8
# warps), so that the x registers it adds do not cut the programs an SM holds (gate_up at (16, 8, 1, 4, 3) / 4 went
# from 80 to 96 registers and lost); not yet run on a GPU
ROUND9: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 8, 1, 4, 3)), ("gemv_h2", (8, 16, 1, 8, 4)), ("gemv_h2", (4, 16, 1, 4, 3))],
    "o": [("gemv_h2", (8, 8, 1, 4, 3)), ("gemv_h2", (4, 16, 1, 4, 3)), ("gemv_h2", (8, 16, 1, 8, 3))],
    "gate_up": [("gemv_h2", (8, 16, 1, 4, 3)), ("gemv_h2", (8, 8, 1, 4, 3)), ("gemv_h2", (16, 8, 1, 8, 3)),
                ("gemv_h2", (8, 8, 1, 4, 4)), ("gemv_h2", (16, 8, 1, 8, 4)), ("gemv_h2", (16, 4, 1, 4, 4))],
    "down": [("gemv_h2", (8, 8, 1, 4, 3)), ("gemv_h2", (8, 16, 1, 8, 3)), ("gemv_h2", (4, 16, 1, 4, 3))],
}

# round 10: the K loop software-pipelined by Triton (config[7] = STAGES, PREFETCH 0): the weight tiles of the
# next STAGES - 1 steps copied into shared memory (cp.async) instead of held in registers, so that more bytes
# are in flight without costing programs an SM; not yet run on a GPU
ROUND10: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 8, 1, 4, 0, 0, 0, 2)), ("gemv_h2", (8, 16, 1, 4, 0, 0, 0, 2))],
    "o": [("gemv_h2", (8, 8, 1, 4, 0, 0, 0, 3)), ("gemv_h2", (8, 16, 1, 4, 0, 0, 0, 2))],
    "gate_up": [("gemv_h2", (16, 8, 1, 4, 0, 0, 0, 2)), ("gemv_h2", (16, 8, 1, 4, 0, 0, 0, 3)),
                ("gemv_h2", (8, 8, 1, 4, 0, 0, 0, 3)), ("gemv_h2", (16, 4, 1, 4, 0, 0, 0, 4))],
    "down": [("gemv_h2", (8, 16, 1, 4, 0, 0, 0, 3)), ("gemv_h2", (8, 8, 1, 4, 0, 0, 0, 4)),
             ("gemv_h2", (16, 8, 1, 4, 0, 0, 0, 3))],
}

# round 11: Llama-3.1-8B's shipped batch-1 configs, role by role, for another model's shapes (whose tables
# otherwise fall back to DISPATCH's default (8, 8, 1, 4)), e.g. Qwen2.5-7B
ROUND11: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 16, 1, 4, 2))],
    "o": [("gemv_h2", (8, 16, 1, 4, 1))],
    "gate_up": [("gemv_h2", (16, 8, 1, 4))],
    "down": [("gemv_h2", (8, 16, 1, 4, 3)), ("gemv_h2", (8, 16, 1, 4, 1))],
}

# round 12: on shapes no sweep had timed (e.g. Llama-3.2-3B, Qwen2.5-1.5B), whose batch-1 choice is now their
# role's (M1_BY_ROLE, round 11's configs): DISPATCH's old default, narrower row tiles (more programs where the
# rows are few) and, for down_proj's long K, two programs a row tile
ROUND12: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 8, 1, 4)), ("gemv_h2", (4, 16, 1, 4, 2))],
    "o": [("gemv_h2", (8, 8, 1, 4)), ("gemv_h2", (4, 16, 1, 4, 1))],
    "gate_up": [("gemv_h2", (8, 8, 1, 4)), ("gemv_h2", (8, 16, 1, 4))],
    "down": [("gemv_h2", (8, 8, 1, 4)), ("gemv_h2", (4, 16, 1, 4, 3)), ("gemv_h2", (8, 16, 2, 4, 3))],
}

# round 13: the hand-written CUDA GEMV (int4_cuda.gemv_w4, x in shared memory; R rows a warp, S steps ahead,
# warps a program), the probe's fastest configs per shape alone (results/cuda_gemv_probe_h100.json). On qkv_proj it
# replaces gemv_h2 with int4_rope's rotary + K/V write epilogue (the rotary then runs with the KV write again).
ROUND13: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("cuda_w4", (2, 2, 8)), ("cuda_w4", (1, 4, 8))],
    "o": [("cuda_w4", (1, 2, 8)), ("cuda_w4", (2, 2, 8))],
    "gate_up": [("cuda_w4", (2, 4, 4)), ("cuda_w4", (1, 2, 8))],
    "down": [("cuda_w4", (2, 2, 4))],
}

# round 14: cuda_w4 releasing the next kernel only after its K loop (config[3] LATE = 1: with PDL the kernels after
# it do not take SM slots while its own programs still wait to start), on the shapes where round 13 was even or near
ROUND14: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("cuda_w4", (2, 2, 8, 1))],
    "o": [("cuda_w4", (1, 2, 8, 1)), ("cuda_w4", (2, 2, 8, 1))],
    "gate_up": [("cuda_w4", (2, 4, 4, 1)), ("cuda_w4", (1, 2, 8, 1))],
}

# round 15: round 13's qkv_proj winner and round 14's gate_up_proj winner, alone and together
ROUND15: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("cuda_w4", (2, 2, 8))],
    "gate_up": [("cuda_w4", (2, 4, 4, 1))],
}

# round 16: back to gemv_h2 (the configs before round 15) on the shapes that ship cuda_w4, e.g. to time fp16
ROUND16: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("gemv_h2", (8, 16, 1, 4, 2))],
    "gate_up": [("gemv_h2", (16, 8, 1, 4))],
}

# round 17: cuda_w4 with K split over KS programs a row (config[4]; the last to finish adds the partials) and, on
# down_proj, the SiLU·mul made while staging x (config[5]: LlamaMLP hands it gate ‖ up, no SiLU·mul launch); x's
# staging now issues all of a thread's loads at once (the shipped qkv/gate_up configs change with it)
ROUND17: dict[str, list[tuple[str, tuple]]] = {
    "o": [("cuda_w4", (2, 2, 8, 0, 2))],
    "down": [("cuda_w4", (2, 2, 8, 0, 4, 1)), ("cuda_w4", (2, 4, 4, 1, 4, 1)), ("cuda_w4", (1, 4, 8, 0, 2, 1)),
             ("cuda_w4", (2, 2, 8, 0, 8, 1))],
}

# round 18: the RMSNorm (and the residual add) made by cuda_w4 while it stages x (config[6]: the decoder layer hands
# qkv_proj / gate_up_proj the layer's input and the residual stream; no add+RMSNorm launch before them)
ROUND18: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("cuda_w4", (2, 2, 8, 0, 1, 0, 1))],
    "gate_up": [("cuda_w4", (2, 4, 4, 1, 1, 0, 1))],
}

# round 19: round 17's split-K / SiLU·mul candidates again — in round 17 (ablations/cuda_w4_round17/) a bug sent every
# split-K or SiLU call to the fallback (torch's SiLU·mul, then gemv_h2): those rows timed the fallback — with
# round 18's qkv_proj norm staging (2453 us against 2498-2501 there)
ROUND19: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("cuda_w4", (2, 2, 8, 0, 1, 0, 1))],
    "down": [("cuda_w4", (2, 2, 8, 0, 4, 1)), ("cuda_w4", (1, 4, 8, 0, 2, 1)), ("cuda_w4", (2, 4, 4, 1, 4, 1)),
             ("cuda_w4", (2, 2, 8, 0, 4))],
}

# round 21 (not yet run): the norm staging on gate_up_proj with fewer, wider programs (each re-reads x, the residual
# stream and the norm weight: 3584 programs of 8 rows cost 2754 us in round 18), and qkv_proj's norm config varied
ROUND21: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("cuda_w4", (1, 4, 8, 0, 1, 0, 1)), ("cuda_w4", (2, 4, 8, 0, 1, 0, 1))],
    "gate_up": [("cuda_w4", (4, 2, 8, 1, 1, 0, 1)), ("cuda_w4", (2, 4, 8, 1, 1, 0, 1))],
}

# round 22: gate_up_proj making the SiLU·mul in its epilogue (config[7]: a warp takes gate rows with their up rows and
# writes silu(gate) · up; LlamaMLP runs down_proj on it, no SiLU·mul launch), alone and with the norm staging
ROUND22: dict[str, list[tuple[str, tuple]]] = {
    "gate_up": [("cuda_w4", (2, 4, 4, 1, 1, 0, 0, 1)), ("cuda_w4", (4, 2, 8, 1, 1, 0, 0, 1)),
                ("cuda_w4", (2, 4, 8, 1, 1, 0, 0, 1)), ("cuda_w4", (2, 4, 4, 1, 1, 0, 1, 1)),
                ("cuda_w4", (4, 2, 8, 1, 1, 0, 1, 1))],
}

# round 23: round 22's two first candidates alone (a short call): the shipped gate_up_proj config with GLU, and wider
ROUND23: dict[str, list[tuple[str, tuple]]] = {"gate_up": ROUND22["gate_up"][:2]}

# round 24: what rounds 21 and 22 left untimed with GLU shipped: qkv_proj's wider programs, and GLU's other gate_up
# configs (8 warps; with the norm staging)
ROUND24: dict[str, list[tuple[str, tuple]]] = {"qkv": ROUND21["qkv"], "gate_up": ROUND22["gate_up"][2:]}

# round 25: cuda_w4's persistent form (config[8]: programs an SM; each warp streams its row groups' weights without a
# break, x staged once a program): gate_up with GLU as shipped, down_proj (K = 14336: 14 chunks, S 7; one-tile programs
# re-staged its 28 KB of x each and lost, round 17) and o_proj
ROUND25: dict[str, list[tuple[str, tuple]]] = {
    "gate_up": [("cuda_w4", (2, 4, 4, 1, 1, 0, 0, 1, 4)), ("cuda_w4", (2, 4, 4, 1, 1, 0, 0, 1, 2))],
    "o": [("cuda_w4", (1, 4, 4, 1, 1, 0, 0, 0, 4))],
    "down": [("cuda_w4", (1, 7, 4, 1, 1, 0, 0, 0, 3)), ("cuda_w4", (2, 7, 4, 1, 1, 0, 0, 0, 3))],
}


# round 26: round 25's nearest miss (down_proj persistent, one row a warp, 2406 against 2376-2382 us) varied: PDL release
# right after the wait, 4 programs an SM, two steps ahead with 8 warps
ROUND26: dict[str, list[tuple[str, tuple]]] = {
    "down": [("cuda_w4", (1, 7, 4, 0, 1, 0, 0, 0, 3)), ("cuda_w4", (1, 7, 4, 1, 1, 0, 0, 0, 4)),
             ("cuda_w4", (1, 2, 8, 1, 1, 0, 0, 0, 2)), ("cuda_w4", (1, 7, 8, 1, 1, 0, 0, 0, 2))],
}


# round 27: round 26's winner (down_proj persistent, 8 warps, 2 programs an SM: 2370.5 against 2378-2382 us) varied
ROUND27: dict[str, list[tuple[str, tuple]]] = {
    "down": [("cuda_w4", (1, 7, 8, 1, 1, 0, 0, 0, 1)), ("cuda_w4", (1, 7, 16, 1, 1, 0, 0, 0, 1)),
             ("cuda_w4", (2, 7, 8, 1, 1, 0, 0, 0, 1)), ("cuda_w4", (1, 7, 12, 1, 1, 0, 0, 0, 1)),
             ("cuda_w4", (1, 7, 8, 1, 1, 0, 0, 0, 2))],
}


# round 28 (down_proj persistent shipped): round 27's shape (8 warps, 2 programs an SM) on o_proj and gate_up_proj
ROUND28: dict[str, list[tuple[str, tuple]]] = {
    "o": [("cuda_w4", (1, 4, 8, 1, 1, 0, 0, 0, 2)), ("cuda_w4", (1, 2, 8, 1, 1, 0, 0, 0, 2))],
    "gate_up": [("cuda_w4", (2, 4, 8, 1, 1, 0, 0, 1, 2)), ("cuda_w4", (2, 2, 8, 1, 1, 0, 0, 1, 2))],
}


# round 29 (not yet run: the device budget ran out): the persistent form with the norm staging, which one-tile
# programs lost by re-reading x, the residual stream and the norm weight in each of thousands of programs (round 24):
# gate_up_proj (GLU) and qkv_proj with 8 warps, 1-2 programs an SM (no post-attention RMSNorm launch where gate_up_proj
# takes it)
ROUND29: dict[str, list[tuple[str, tuple]]] = {
    "gate_up": [("cuda_w4", (2, 4, 8, 1, 1, 0, 1, 1, 2)), ("cuda_w4", (2, 4, 8, 1, 1, 0, 1, 1, 1))],
    "qkv": [("cuda_w4", (2, 2, 8, 0, 1, 0, 1, 0, 2)), ("cuda_w4", (1, 4, 8, 1, 1, 0, 1, 0, 2))],
}


# round 30: o_proj on cuda_w4's one-tile form with S = 4 (its K of 4096 is four steps: the whole weight slice of each
# warp is loaded before the PDL wait). o_proj's programs launch while attention runs (the attention and merge kernels
# release their successor before they wait), when memory is mostly idle; qkv_proj, whose predecessor is down_proj (memory
# bound), lost with S = 4 (round 24) — but those configs needed two waves of programs (384 / 768 programs, 2-4 an SM
# by registers); here qkv_proj (with its norm staging) gets S = 4 in one wave: 128 programs of 16 warps × 3 rows
# (128 registers a thread) or 12 warps × 4 rows (168), one an SM. No LATE: the release right after the wait
ROUND30: dict[str, list[tuple[str, tuple]]] = {
    "o": [("cuda_w4", (1, 4, 8)), ("cuda_w4", (2, 4, 4)), ("cuda_w4", (1, 4, 4)), ("cuda_w4", (2, 4, 8))],
    "qkv": [("cuda_w4", (3, 4, 16, 0, 1, 0, 1)), ("cuda_w4", (4, 4, 12, 0, 1, 0, 1))],
}


# round 31 (prepared): the other shipped model configs (Llama-3.2-3B, Qwen2.5-1.5B, Qwen2.5-7B: random weights), whose
# shapes still run gemv_h2 at batch 1, on cuda_w4 role by role with Llama-3.1-8B's shipped forms: qkv_proj with the
# norm staging, o_proj one-tile, gate_up_proj with SiLU·mul (GLU), down_proj persistent (where its chunks are a multiple
# of S = 4: Llama-3.2-3B's K = 8192; elsewhere the one-tile form runs)
ROUND31: dict[str, list[tuple[str, tuple]]] = {
    "qkv": [("cuda_w4", (2, 2, 8, 0, 1, 0, 1))],
    "o": [("cuda_w4", (2, 2, 8))],
    "gate_up": [("cuda_w4", (2, 4, 4, 1, 1, 0, 0, 1))],
    "down": [("cuda_w4", (1, 4, 8, 1, 1, 0, 0, 0, 2))],
}


def model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(N, K) of the first int4 linear of each role (qkv, o, gate_up, down) in a loaded model."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        role = ROLES.get(name.rsplit(".", 1)[-1])
        if role and role not in shapes and hasattr(module, "out_features") and hasattr(module, "group_size"):
            shapes[role] = (module.out_features, module.in_features)
    return shapes


def candidates(which: str) -> dict[str, list[tuple[str, tuple]]]:
    """The configs of the rounds named, comma-separated ("round2,round3"), or of all of them ("all":
    for a GPU or model not swept yet)."""
    known = {"round1": ROUND1, "round2": CANDIDATES, "round3": ROUND3, "round4": ROUND4, "round5": ROUND5,
             "round6": ROUND6, "round7": ROUND7, "round8": ROUND8,
             "round9": ROUND9, "round10": ROUND10,
             "round11": ROUND11, "round12": ROUND12, "round13": ROUND13,
             "round14": ROUND14, "round15": ROUND15, "round16": ROUND16, "round17": ROUND17, "round18": ROUND18, "round19": ROUND19,
             "round21": ROUND21, "round22": ROUND22, "round23": ROUND23,
             "round24": ROUND24, "round25": ROUND25, "round26": ROUND26, "round27": ROUND27,
             "round28": ROUND28, "round29": ROUND29, "round30": ROUND30,
             "round31": ROUND31}
    if which == "none":  # the shipped tables only (with --fused-ab or --ablate-gemv)
        return {}
    names = list(known) if which == "all" else which.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"int4_variants: unknown --candidates {unknown}; known: {sorted(known)} or all")
    rounds = [known[n] for n in names]
    out: dict[str, list[tuple[str, tuple]]] = {}
    for table in rounds:
        for role, cands in table.items():
            out.setdefault(role, []).extend(c for c in cands if c not in out[role])
    return out


def label(v: dict) -> str:
    return ", ".join(f"{name} {kernel} {cfg}" for name, (kernel, cfg) in v.items()) or "shipped"


def tables(v: dict, shipped: dict, shapes: dict) -> dict:
    """SHAPE_DISPATCH with v's batch-1 entries over the shipped ones."""
    out = {shape: dict(t) for shape, t in shipped.items()}
    for name, choice in v.items():
        out.setdefault(shapes[name], {})[1] = choice
    return out


def best_combo(results: list[dict], variants: list[dict]) -> dict:
    base = statistics.median(r["itl_us"] for r, v in zip(results, variants) if not v)
    best: dict[str, tuple[float, tuple]] = {}
    for r, v in zip(results, variants):
        if not v or r["itl_us"] > base - 5:
            continue
        (name, choice), = v.items()
        if name not in best or r["itl_us"] < best[name][0]:
            best[name] = (r["itl_us"], choice)
    return {name: choice for name, (_, choice) in best.items()}


def _no_gemv(x: torch.Tensor, w, bias, config=None) -> torch.Tensor:
    """--ablate-gemv: an int4 linear's output allocated, no kernel (the values are garbage; timing only)."""
    return torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)


def _ablated(op: str, model=None):
    """--ablate-ops: (object, attribute, replacement) making one kind of small kernel launch nothing in the
    step (timing only; the values are garbage): "rmsnorm" both RMSNorms (their output a fixed buffer of small
    values, so that nothing overflows; the residual passed through), "silu" SiLU·mul (gate passed through),
    "merge" the decode attention's merge of its splits (its output left as it was)."""
    import importlib

    from edgelm.layers.activation import SiluAndMul
    from edgelm.layers.layernorm import RMSNorm

    # the module (the package's name decode_attention is its function)
    decode_attention = importlib.import_module("edgelm.layers.attention.triton_ops.decode_attention")

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def fixed_norm():
        norm = next(m for m in model.modules() if isinstance(m, RMSNorm))
        # the decode graphs (captured first) keep their rows' address: big enough for the prefills timed here
        bufs = [torch.full((4096, norm.weight.shape[0]), 0.05, dtype=norm.weight.dtype, device=norm.weight.device)]

        def rows(n: int) -> torch.Tensor:  # grown only by a prefill longer than 4096 tokens (eager)
            if bufs[0].shape[0] < n:
                bufs[0] = torch.full((n, bufs[0].shape[1]), 0.05, dtype=bufs[0].dtype, device=bufs[0].device)
            return bufs[0][:n]
        return lambda self, x, residual=None: rows(x.shape[0]) if residual is None else (rows(x.shape[0]), residual)

    table = {"rmsnorm": (RMSNorm, "forward", fixed_norm if model is not None else None),
             "silu": (SiluAndMul, "forward", lambda: lambda self, x: x[..., : x.shape[-1] // 2]),
             "merge": (decode_attention, "_decode_merge_kernel", _NoLaunch)}
    if op not in table:
        raise SystemExit(f"int4_variants: unknown --ablate-ops {op!r}; known: {sorted(table)}")
    obj, attr, make = table[op]
    return obj, attr, make() if make is not None else None


def _clamped_embedding():
    """(object, attribute, replacement): token ids clamped into the vocabulary before the embedding (one small
    kernel), for the ablation runs and their baselines alike: an ablated step's garbage logits may pick any id."""
    import torch.nn.functional as F

    from edgelm.layers.vocab_embedding import VocabEmbedding

    return VocabEmbedding, "forward", lambda self, ids: F.embedding(ids.clamp(0, self.weight.shape[0] - 1), self.weight)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = {"--candidates": "round2"}
    for flag in ("--out", "--dispatch-out", "--candidates"):
        if flag in argv:
            i = argv.index(flag)
            opts[flag] = argv[i + 1]
            del argv[i:i + 2]
    ablate = "--ablate-gemv" in argv
    ablate_ops: list[str] = []
    if "--ablate-ops" in argv:
        i = argv.index("--ablate-ops")
        ablate_ops = [op for op in argv[i + 1].split(",") if op]
        del argv[i:i + 2]
        for op in ablate_ops:
            _ablated(op)  # unknown names stop here, before the model loads
    if ablate:
        argv.remove("--ablate-gemv")
    ops_ab: list[str] = []
    if "--fused-ab" in argv:
        argv.remove("--fused-ab")
        ops_ab = ["int4_rope", "fused_int4"]
    if "--ops-ab" in argv:
        i = argv.index("--ops-ab")
        ops_ab = [op for op in argv[i + 1].split(",") if op]
        del argv[i:i + 2]
    env_ab: list[str] = []
    if "--env-ab" in argv:
        i = argv.index("--env-ab")
        env_ab = [a for a in argv[i + 1].split(";") if a]
        if not all("=" in a for a in env_ab):
            raise SystemExit("--env-ab takes VAR=value[;VAR=value...]")
        del argv[i:i + 2]
    server_args, bench, _ = bench_one_batch.prepare_args(argv)
    device = server_args.resolved_device()
    config = ModelConfig.load(resolve_model(server_args.model_path), server_args.dtype, device,
                              server_args.context_length)
    runner = ModelRunner(server_args, config, device)
    bs, input_len, output_len = bench.batch_size[0], bench.input_len[0], bench.output_len[0]
    shapes = model_shapes(runner.model)
    if not shapes:
        raise SystemExit("int4_variants: the model has no int4 layers (--torchao-config int4wo-*, or an AWQ/GPTQ checkpoint)")
    sweep = {role: cands for role, cands in candidates(opts["--candidates"]).items() if role in shapes}
    shipped = {shape: dict(t) for shape, t in int4_kernels.SHAPE_DISPATCH.items()}
    # the variants replace the batch-1 choice in effect: for a shape no table names, its role's default
    base = {shape: dict(t) for shape, t in shipped.items()}
    for n, k in shapes.values():
        if 1 in int4_kernels.DISPATCH and 1 not in base.get((n, k), {}):
            base.setdefault((n, k), {})[1] = int4_kernels.m1_unswept(n, k)
    results: list[dict] = []

    def measure(v: dict) -> dict:
        int4_kernels.SHAPE_DISPATCH.clear()
        int4_kernels.SHAPE_DISPATCH.update(tables(v, base, shapes))
        runner.set_attention_backend(runner.attention_backend_name)  # recaptures the graphs
        bench_one_batch.run_once(runner, bs, input_len, 8, overlap=True)
        steps = []
        for _ in range(3):
            steps += bench_one_batch.run_once(runner, bs, input_len, output_len, overlap=True)["decode_s"]
        r = {"label": label(v), "variant": {k: [c[0], list(c[1])] for k, c in v.items()},
             "itl_us": 1e6 * statistics.median(steps)}
        results.append(r)
        print(f"{r['label']:>50}: {r['itl_us']:.1f} us", flush=True)
        if opts.get("--out"):  # so far (a call cut short keeps what it measured)
            write_json(opts["--out"], {"partial": True, "shapes": {k: list(s) for k, s in shapes.items()},
                                       "results": results})
        return r

    first: list[dict] = [{}]
    for name, cands in sweep.items():
        first += [{name: c} for c in cands]
        if name == "o":
            first.append({})
    first.append({})
    for v in first:
        measure(v)
    combo = best_combo(results, first)  # (before any ablation row is added)
    if combo:
        for v in (combo, {}, combo):
            measure(v)
    if ops_ab:  # each op on, off, on around the shipped step; then all of them together
        from edgelm.layers import triton_ops
        plain_ops = ",".join(sorted(triton_ops._enabled))
        order = [x for op in ops_ab for x in (op, None, op)] + ([",".join(ops_ab), None] if len(ops_ab) > 1 else [])
        from edgelm.layers.triton_ops.l2_prefetch import mark_l2_prefetch
        from edgelm.quantization.int4_linear import set_meta_pairs
        for op in order:
            names = [o.split("@")[0] for o in (op or "").split(",") if o]
            mb = [float(o.split("@")[1]) for o in (op or "").split(",") if "@" in o]
            off = {n[1:] for n in names if n.startswith("-")}  # "-op": that switch off instead
            triton_ops.set_enabled(",".join([o for o in plain_ops.split(",") if o not in off]
                                            + [n for n in names if not n.startswith("-")]))
            mark_l2_prefetch(runner.model, int(mb[0] * 2**20) if mb else None)  # l2_prefetch@MB: that budget
            set_meta_pairs(runner.model)  # int4_meta_pairs: built where on, dropped where off
            try:
                r = measure({})
            finally:
                triton_ops.set_enabled(plain_ops)
            r["label"] = f"shipped + {op}" if op else "shipped (A/B baseline)"
            r["ops_added"] = op
    for assign in [x for a in env_ab for x in (a, None, a)]:  # each setting, the shipped step, it again
        var, value = assign.split("=", 1) if assign else (None, None)
        before = os.environ.get(var) if var else None
        if var:
            os.environ[var] = value
        try:
            r = measure({})  # (the attention backend is made anew, so EDGELM_DECODE_CONFIG applies)
        finally:
            if var and before is None:
                os.environ.pop(var)
            elif var:
                os.environ[var] = before
        r["label"] = f"shipped + {assign}" if assign else "shipped (env A/B baseline)"
        r["env_added"] = assign
    if ablate:  # the shipped step with every batch-1 int4 GEMV launching nothing: what the rest of the step costs
        kernels = dict(int4_kernels.KERNELS)
        int4_kernels.KERNELS.update({k: _no_gemv for k in kernels})
        try:
            r = measure({})
            r["label"] = "shipped, int4 GEMVs replaced by nothing (ablation)"
            r["ablation"] = True
        finally:
            int4_kernels.KERNELS.update(kernels)
    # each small kernel launching nothing, alone, then all of them: at most what fusing it away could save
    for ops in [[op] for op in ablate_ops] + ([ablate_ops] if len(ablate_ops) > 1 else []):
        for ablated in (True, False):
            saved = []
            for obj, attr, repl in [_clamped_embedding()] + ([_ablated(op, runner.model) for op in ops] if ablated else []):
                saved.append((obj, attr, getattr(obj, attr)))
                setattr(obj, attr, repl)
            try:
                r = measure({})
            finally:
                for obj, attr, orig in reversed(saved):
                    setattr(obj, attr, orig)
            r["label"] = (f"shipped, {'+'.join(ops)} replaced by nothing (ablation)" if ablated
                          else "shipped (ablation baseline)")
            r["ablation"] = ablated
            r["clamped_ids"] = True
    int4_kernels.SHAPE_DISPATCH.clear()
    int4_kernels.SHAPE_DISPATCH.update(shipped)
    if opts.get("--dispatch-out"):
        write_json(opts["--dispatch-out"], {**int4_kernels.dispatch_json(None, tables(combo, base, shapes)),
                                            "combo": label(combo)})
    report = {"command": "python benchmarks/gpu/int4_variants.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch_size": bs,
              "input_len": input_len, "output_len": output_len, "shapes": {k: list(v) for k, v in shapes.items()},
              "combo": label(combo), "results": results}
    if opts.get("--out"):
        write_json(opts["--out"], report)
    return report


if __name__ == "__main__":
    main()
