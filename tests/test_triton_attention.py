"""The Triton attention backend against torch_native on random inputs (decode, extend, CUDA graphs).

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), so shapes stay tiny."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from edgelm.layers.attention.radix_attention import RadixAttention
from edgelm.layers.attention.torch_native_backend import TorchNativeAttnBackend
from edgelm.layers.attention.triton_backend import TritonAttnBackend
from edgelm.layers.attention.triton_ops import DecodeConfig, ExtendConfig
from edgelm.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from edgelm.model_executor.forward_batch import ForwardBatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


class Setup:
    """A shared req_to_token, two identical KV pools (one per backend), and both backends."""

    def __init__(self, num_heads, num_kv_heads, head_dim, dtype, pool_size, max_ctx, num_reqs=8, seed=0):
        torch.manual_seed(seed)
        self.dtype = dtype
        self.layer = RadixAttention(num_heads, head_dim, head_dim**-0.5, num_kv_heads, layer_id=0)
        self.req_pool = ReqToTokenPool(num_reqs, max_ctx, DEVICE)
        self.ref_pool = MHATokenToKVPool(pool_size, dtype, num_kv_heads, head_dim, 1, DEVICE)
        self.tri_pool = MHATokenToKVPool(pool_size, dtype, num_kv_heads, head_dim, 1, DEVICE)
        for ref, tri in zip(self.ref_pool.k_buffer + self.ref_pool.v_buffer,
                            self.tri_pool.k_buffer + self.tri_pool.v_buffer):
            ref.copy_(torch.randn(ref.shape, device=DEVICE).to(dtype))
            tri.copy_(ref)
        cfg = SimpleNamespace(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        runner = SimpleNamespace(device=DEVICE, dtype=dtype, model_config=cfg, req_to_token_pool=self.req_pool,
                                 token_to_kv_pool=self.ref_pool)
        self.ref = TorchNativeAttnBackend(runner)
        self.tri = TritonAttnBackend(runner)
        # free kv slots in random order: requests' slots are scattered over the pool
        self.free = (torch.randperm(pool_size) + 1).tolist()

    def place(self, req: int, start: int, n: int) -> torch.Tensor:
        slots = torch.tensor([self.free.pop() for _ in range(n)], dtype=torch.int64)
        self.req_pool.write(req, start, slots.to(DEVICE))
        return slots

    def qkv(self, num_tokens):
        """q, k, v as column slices of one fused projection output (strided, like the models')."""
        h, hkv, d = self.layer.tp_q_head_num, self.layer.tp_k_head_num, self.layer.head_dim
        qkv = torch.randn(num_tokens, (h + 2 * hkv) * d, device=DEVICE).to(self.dtype)
        return qkv.split([h * d, hkv * d, hkv * d], dim=-1)

    def run(self, backend, pool, fb, q, k, v):
        fb.token_to_kv_pool = pool
        fb.req_to_token_pool = self.req_pool
        backend.init_forward_metadata(fb)
        return backend.forward(q, k, v, self.layer, fb)

    def compare(self, fb, q, k, v):
        out_ref = self.run(self.ref, self.ref_pool, fb, q, k, v)
        out_tri = self.run(self.tri, self.tri_pool, fb, q, k, v)
        assert out_tri.dtype == q.dtype and out_tri.shape == q.shape
        err = (out_tri.float() - out_ref.float()).norm() / out_ref.float().norm()
        assert err < TOL[self.dtype], f"relative error {err:.2e}"
        assert torch.equal(self.tri_pool.k_buffer[0], self.ref_pool.k_buffer[0])
        assert torch.equal(self.tri_pool.v_buffer[0], self.ref_pool.v_buffer[0])


def decode_batch(s: Setup, req_ids, seq_lens):
    new_slots = [s.place(r, 0, n)[-1:] for r, n in zip(req_ids, seq_lens)]
    return ForwardBatch.for_decode([0] * len(req_ids), req_ids, seq_lens, torch.cat(new_slots), DEVICE)


def extend_batch(s: Setup, req_ids, prefix_lens, extend_lens):
    new_slots = [s.place(r, 0, p + e)[p:] for r, p, e in zip(req_ids, prefix_lens, extend_lens)]
    return ForwardBatch.for_extend([0] * sum(extend_lens), req_ids, prefix_lens, extend_lens, torch.cat(new_slots),
                                   DEVICE)


def test_unavailable_reason_names_the_fallback():
    reason = TritonAttnBackend.unavailable_reason("cpu")
    assert reason and "torch_native" in reason


# (q heads, kv heads, head_dim, dtype): GQA, a group of 3 with an odd head_dim, MHA
SMALL_SHAPES = [(4, 2, 32, torch.float32), (6, 2, 24, torch.float16), (2, 2, 16, torch.float32)]


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("forced_splits,merge_in_kernel,prefetch_kv", [(False, True, False), (True, True, False),
                                                                        (True, False, False), (False, True, True),
                                                                        (True, False, True)])
def test_decode_matches_torch_native(shape, forced_splits, merge_in_kernel, prefetch_kv):
    """prefetch_kv: each split's first K/V block read before the PDL wait, the newest token's row
    after it (lengths 1, 37, 70, 16 put the newest token in a first block and in later ones).
    The in-kernel merge reads several heads' splits at once (a group of 3 heads: 4 lanes, one masked)."""
    h, hkv, d, dtype = shape
    s = Setup(h, hkv, d, dtype, pool_size=300, max_ctx=128)
    # forced: many programs per SM, so long requests run in several splits and short ones in one
    s.tri.decode_config = DecodeConfig(block_n=16, num_warps=1, num_stages=1, min_split_len=16, max_splits=4,
                                       programs_per_sm=64 if forced_splits else 1, merge_in_kernel=merge_in_kernel,
                                       prefetch_kv=prefetch_kv)
    fb = decode_batch(s, [5, 0, 2, 7], [1, 37, 70, 16])
    s.compare(fb, *s.qkv(4))
    counters = s.tri._counters(4)  # the buffer the backend hands the kernel
    assert counters.numel() >= 4 and not counters.any()  # the merge leaves its counters at zero


@pytest.mark.parametrize("shape", SMALL_SHAPES[:2])
def test_extend_matches_torch_native(shape):
    h, hkv, d, dtype = shape
    s = Setup(h, hkv, d, dtype, pool_size=300, max_ctx=128)
    s.tri.extend_config = ExtendConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    prefix_lens, extend_lens = [0, 13, 40, 7], [5, 20, 33, 1]
    fb = extend_batch(s, [1, 4, 0, 6], prefix_lens, extend_lens)
    s.compare(fb, *s.qkv(sum(extend_lens)))


def test_graph_hooks_with_padded_rows():
    """The capture-time metadata (static scratch, splits fixed from max_context_len) gives the
    same answer as eager, padded rows included (req 0, seq_len 1, kv slot 0)."""
    s = Setup(4, 2, 16, torch.float32, pool_size=200, max_ctx=96)
    s.tri.decode_config = DecodeConfig(block_n=16, num_warps=1, num_stages=1, min_split_len=16, max_splits=4,
                                       programs_per_sm=64)
    s.tri.init_cuda_graph_state(max_bs=4, max_context_len=96)
    real = decode_batch(s, [3, 1], [50, 9])
    # pad to bs 4 as the graph runner does
    pad = lambda t, value: torch.cat([t, torch.full((2,), value, dtype=t.dtype, device=t.device)])  # noqa: E731
    fb = ForwardBatch.for_decode([0] * 4, [3, 1, 0, 0], [50, 9, 1, 1], pad(real.out_cache_loc, 0), DEVICE)
    fb.token_to_kv_pool, fb.req_to_token_pool = s.tri_pool, s.req_pool
    q, k, v = s.qkv(4)
    s.tri.init_forward_metadata_capture_cuda_graph(4, fb)
    s.tri.init_forward_metadata_replay_cuda_graph(4, fb)
    out_graph = s.tri.forward_decode(q, k, v, s.layer, fb)
    out_ref = s.run(s.ref, s.ref_pool, real, q[:2], k[:2], v[:2])
    torch.testing.assert_close(out_graph[:2], out_ref, atol=2e-4, rtol=2e-4)


# ---------------- GPU: real shapes, bf16, CUDA graphs ----------------

LLAMA8B = (32, 8, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [LLAMA8B, (14, 2, 64), (16, 16, 256)])
def test_decode_gpu(shape, dtype):
    h, hkv, d = shape
    s = Setup(h, hkv, d, dtype, pool_size=40_000, max_ctx=4100, num_reqs=16)
    seq_lens = [1, 2, 63, 64, 65, 500, 1024, 4096, 3000, 7, 129, 2049]
    fb = decode_batch(s, list(range(len(seq_lens))), seq_lens)
    s.compare(fb, *s.qkv(len(seq_lens)))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [LLAMA8B, (28, 4, 128)])  # Qwen2.5-7B: 7 heads a program, not a power of 2
def test_decode_gpu_merge_in_kernel(shape):
    """The merge inside the attention launch (attn_merge; the second kernel's runs in test_decode_gpu), several
    heads' splits a load."""
    import dataclasses

    h, hkv, d = shape
    s = Setup(h, hkv, d, torch.bfloat16, pool_size=40_000, max_ctx=4100, num_reqs=16)
    s.tri.decode_config = dataclasses.replace(s.tri.decode_config, merge_in_kernel=True)
    for seq_lens in ([1024], [1, 2, 63, 64, 65, 500, 1024, 4096, 3000, 7, 129, 2049]):
        fb = decode_batch(s, list(range(len(seq_lens))), seq_lens)
        s.compare(fb, *s.qkv(len(seq_lens)))


@pytest.mark.gpu
def test_decode_gpu_one_split():
    """A batch large enough to fill the GPU runs in one split: stage 1 writes the output itself."""
    h, hkv, d = LLAMA8B
    s = Setup(h, hkv, d, torch.bfloat16, pool_size=60_000, max_ctx=2100, num_reqs=48)
    seq_lens = torch.randint(1, 2048, (48,)).tolist()
    fb = decode_batch(s, list(range(48)), seq_lens)
    s.tri.init_forward_metadata(fb)
    assert s.tri.forward_metadata.mid_o.shape[2] == 1
    s.compare(fb, *s.qkv(48))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["decode", "extend"])
def test_fused_rope_kv_write_gpu(dtype, mode):
    """The model hands its rotary to the backend: Triton fuses it with the KV write (one launch);
    torch_native applies it first. Same output, same pool contents (up to the rotation's rounding)."""
    from edgelm.layers.rotary import RotaryEmbedding

    h, hkv, d = LLAMA8B
    s = Setup(h, hkv, d, dtype, pool_size=12_000, max_ctx=3000)
    rope = RotaryEmbedding(d, 4096, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           device=DEVICE)
    if mode == "decode":
        seq_lens = [1, 70, 1500, 2900]
        fb = decode_batch(s, [0, 1, 2, 3], seq_lens)
        positions = torch.tensor(seq_lens, device=DEVICE) - 1
    else:
        prefix_lens, extend_lens = [0, 500, 63], [300, 129, 1]
        fb = extend_batch(s, [0, 1, 2], prefix_lens, extend_lens)
        positions = torch.cat([torch.arange(p, p + e) for p, e in zip(prefix_lens, extend_lens)]).to(DEVICE)
    q, k, v = s.qkv(positions.numel())
    outs = []
    for backend, pool in ((s.ref, s.ref_pool), (s.tri, s.tri_pool)):
        fb.token_to_kv_pool, fb.req_to_token_pool = pool, s.req_pool
        backend.init_forward_metadata(fb)
        qc, kc, vc = (t.clone() for t in (q, k, v))
        outs.append(backend.forward(qc, kc, vc, s.layer, fb, rope=(positions, rope)))
    err = (outs[1].float() - outs[0].float()).norm() / outs[0].float().norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    slots = fb.out_cache_loc
    torch.testing.assert_close(s.tri_pool.k_buffer[0][slots], s.ref_pool.k_buffer[0][slots], atol=2e-2, rtol=1.6e-2)
    assert torch.equal(s.tri_pool.v_buffer[0][slots], s.ref_pool.v_buffer[0][slots])


@pytest.mark.gpu
def test_decode_gpu_float32():
    s = Setup(8, 2, 128, torch.float32, pool_size=10_000, max_ctx=3000)
    fb = decode_batch(s, [0, 1, 2], [5, 1000, 2900])
    s.compare(fb, *s.qkv(3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [LLAMA8B, (14, 2, 64), (16, 16, 256)])
def test_extend_gpu(shape, dtype):
    h, hkv, d = shape
    s = Setup(h, hkv, d, dtype, pool_size=12_000, max_ctx=3000)
    prefix_lens, extend_lens = [0, 500, 1000, 63, 0], [300, 700, 129, 1, 1500]
    fb = extend_batch(s, [0, 1, 2, 3, 4], prefix_lens, extend_lens)
    s.compare(fb, *s.qkv(sum(extend_lens)))


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [8, 40])  # several kv splits; one split (no merge kernel)
def test_decode_cuda_graph_replay(bs):
    """Capture decode with the graph hooks, replay with new requests, compare with eager torch_native."""
    h, hkv, d = LLAMA8B
    s = Setup(h, hkv, d, torch.bfloat16, pool_size=30_000, max_ctx=4100, num_reqs=16)
    max_bs = bs
    s.tri.init_cuda_graph_state(max_bs, 4100)
    # static buffers, as the graph runner keeps them
    req_static = torch.zeros(max_bs, dtype=torch.int64, device=DEVICE)
    lens_static = torch.ones(max_bs, dtype=torch.int32, device=DEVICE)
    loc_static = torch.zeros(max_bs, dtype=torch.int64, device=DEVICE)
    q_static, k_static, v_static = (t.contiguous() for t in s.qkv(max_bs))

    def load(req_ids, seq_lens):
        """Fill the static buffers with a new batch, padded to bs; return the unpadded batch."""
        real = decode_batch(s, req_ids, seq_lens)
        n = len(req_ids)
        req_static.zero_()
        lens_static.fill_(1)
        loc_static.zero_()
        req_static[:n], lens_static[:n], loc_static[:n] = real.req_pool_indices, real.seq_lens, real.out_cache_loc
        q, k, v = s.qkv(n)
        q_static[:n], k_static[:n], v_static[:n] = q, k, v
        return real, (q, k, v)

    fb = ForwardBatch.for_decode([0] * bs, [0] * bs, [1] * bs, loc_static[:bs], DEVICE)
    fb.req_pool_indices, fb.seq_lens, fb.out_cache_loc = req_static[:bs], lens_static[:bs], loc_static[:bs]
    fb.token_to_kv_pool, fb.req_to_token_pool = s.tri_pool, s.req_pool
    load([0, 1, 2], [100, 2000, 4000])
    s.tri.init_forward_metadata_capture_cuda_graph(bs, fb)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        s.tri.forward_decode(q_static[:bs], k_static[:bs], v_static[:bs], s.layer, fb)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = s.tri.forward_decode(q_static[:bs], k_static[:bs], v_static[:bs], s.layer, fb)

    # the eager warm-up wrote K/V into the triton pool: bring the reference pool level
    s.ref_pool.k_buffer[0].copy_(s.tri_pool.k_buffer[0])
    s.ref_pool.v_buffer[0].copy_(s.tri_pool.v_buffer[0])
    for req_ids, seq_lens in [([3, 4, 5, 6, 7], [1, 33, 4095, 1500, 64]), ([8, 9], [3000, 17])]:
        real, (q, k, v) = load(req_ids, seq_lens)
        fb.seq_lens_cpu = lens_static[:bs].cpu()
        s.tri.init_forward_metadata_replay_cuda_graph(bs, fb)
        graph.replay()
        out_ref = s.run(s.ref, s.ref_pool, real, q, k, v)
        n = len(req_ids)
        err = (out_static[:n].float() - out_ref.float()).norm() / out_ref.float().norm()
        assert err < TOL[torch.bfloat16], f"relative error {err:.2e}"
        slots = real.out_cache_loc
        assert torch.equal(s.tri_pool.k_buffer[0][slots], s.ref_pool.k_buffer[0][slots])
