"""Per-sample IWTD epilogue: head means, bridge softmax, normalisation, min-max, p, Philox, keep order.

One program per sample (grid = (B,)); everything here is O(S * (H + M)) per sample. Passes over the
tokens in chunks (any S, fixed registers):

1. bridge softmax statistics: per bridge token m, the online max and sum of ``exp`` of its logits over
   the sample's valid tokens (softmax over tokens, docs/design.md §1 step 3);
2. s3_j = max_m G[m, j]; s1_j, s2_j = head means of the per-head partials (summed in head order: no
   atomics, deterministic); all three masked to C, parked in a float32 scratch row, and summed over C;
3. I_j = (s1/sum1 + s2/sum2 + s3/sum3) / 3 (stored: it is an output), and its min and max over C;
4. p_j, the Philox draw ``tl.rand(seed, b * row_stride + j)``, the drop mask, and the keep order: each
   kept token's slot is the inclusive prefix sum of the keep mask plus the count of earlier chunks;
5. slots >= count get -1 (disjoint from the slots written in 4, so no barrier between them).

A ``tl.debug_barrier()`` separates a pass that stores a row from the one that reloads it with a
different thread mapping. All scratch loads are masked.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .iwtd_scores import pow2


@triton.jit(do_not_specialize=["S", "row_stride"])
def _epilogue_kernel(
    part_ptr, logits_ptr, valid_ptr, elig_ptr, anchor_ptr, seed_ptr, scratch_ptr,
    imp_ptr, prob_ptr, mask_ptr, count_ptr, order_ptr,
    S, H, M, row_stride, stride_lr,
    p_max, p_range, inv_h,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    tok = b * S
    a = tl.load(anchor_ptr + b)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    scr = scratch_ptr + b * 3 * S  # (B, 3, S): s1 | s2 | s3 masked to C

    # 1. softmax statistics of each bridge token over the sample's valid tokens
    mx = tl.full([BLOCK_M], NEG_INF, tl.float32)
    sm = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t0 in range(0, S, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < S
        tv = (tl.load(valid_ptr + tok + offs_t, mask=t_in, other=0) != 0) & t_in
        lg = tl.load(logits_ptr + (tok + offs_t)[:, None] * stride_lr + offs_m[None, :],
                     mask=tv[:, None] & m_ok[None, :], other=NEG_INF)
        m_new = tl.maximum(mx, tl.max(lg, axis=0))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        sm = sm * tl.exp(mx - m_use) + tl.sum(tl.exp(lg - m_use[None, :]), axis=0)
        mx = m_new
    mx_use = tl.where(mx == NEG_INF, 0.0, mx)
    sm_pos = tl.where(sm > 0.0, sm, 1.0)

    # 2. the three scores, masked to C, parked in scratch, summed over C
    tot1 = tl.zeros([BLOCK_T], dtype=tl.float32)
    tot2 = tl.zeros([BLOCK_T], dtype=tl.float32)
    tot3 = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, S, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < S
        tv = (tl.load(valid_ptr + tok + offs_t, mask=t_in, other=0) != 0) & t_in
        content = tv & (offs_t != a)
        lg = tl.load(logits_ptr + (tok + offs_t)[:, None] * stride_lr + offs_m[None, :],
                     mask=tv[:, None] & m_ok[None, :], other=NEG_INF)
        g = tl.exp(lg - mx_use[None, :]) / sm_pos[None, :]
        g = tl.where(m_ok[None, :], g, 0.0)  # G >= 0, so 0 never wins a max over real bridge tokens
        s3 = tl.where(content, tl.max(g, axis=1), 0.0)
        s1 = tl.zeros([BLOCK_T], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_T], dtype=tl.float32)
        for h in range(H):
            s1 += tl.load(part_ptr + ((b * 2 + 0) * H + h) * S + offs_t, mask=t_in, other=0.0)
            s2 += tl.load(part_ptr + ((b * 2 + 1) * H + h) * S + offs_t, mask=t_in, other=0.0)
        s1 = tl.where(content, s1 * inv_h, 0.0)
        s2 = tl.where(content, s2 * inv_h, 0.0)
        tot1 += s1
        tot2 += s2
        tot3 += s3
        tl.store(scr + offs_t, s1, mask=t_in)
        tl.store(scr + S + offs_t, s2, mask=t_in)
        tl.store(scr + 2 * S + offs_t, s3, mask=t_in)
    d1 = tl.sum(tot1, axis=0) + 1e-8
    d2 = tl.sum(tot2, axis=0) + 1e-8
    d3 = tl.sum(tot3, axis=0) + 1e-8
    tl.debug_barrier()

    # 3. importance and its min / max over C
    lo_v = tl.full([BLOCK_E], float("inf"), tl.float32)
    hi_v = tl.full([BLOCK_E], NEG_INF, tl.float32)
    for e0 in range(0, S, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        s_in = offs < S
        content = (tl.load(valid_ptr + tok + offs, mask=s_in, other=0) != 0) & s_in & (offs != a)
        imp = (tl.load(scr + offs, mask=s_in, other=0.0) / d1 + tl.load(scr + S + offs, mask=s_in, other=0.0) / d2
               + tl.load(scr + 2 * S + offs, mask=s_in, other=0.0) / d3) / 3.0
        tl.store(imp_ptr + tok + offs, imp, mask=s_in)
        lo_v = tl.minimum(lo_v, tl.where(content, imp, float("inf")))
        hi_v = tl.maximum(hi_v, tl.where(content, imp, NEG_INF))
    lo = tl.min(lo_v, axis=0)
    span = tl.max(hi_v, axis=0) - lo
    span = tl.where(span > 0.0, span, 1.0)
    tl.debug_barrier()

    # 4. probabilities, draws, mask, keep slots
    seed = tl.load(seed_ptr)
    count = tl.sum(tl.zeros([BLOCK_E], dtype=tl.int32), axis=0)
    for e0 in range(0, S, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        s_in = offs < S
        valid = (tl.load(valid_ptr + tok + offs, mask=s_in, other=0) != 0) & s_in
        elig = (tl.load(elig_ptr + tok + offs, mask=s_in, other=0) != 0) & valid & (offs != a)
        imp = tl.load(imp_ptr + tok + offs, mask=s_in, other=0.0)
        normed = (imp - lo) / span
        prob = tl.where(elig, p_max - normed * p_range, 0.0)
        u = tl.rand(seed, b * row_stride + offs.to(tl.int64))
        drop = elig & (u < prob)
        keep_i = (valid & ~drop).to(tl.int32)
        slot = count + tl.cumsum(keep_i, axis=0) - 1
        tl.store(prob_ptr + tok + offs, prob, mask=s_in)
        tl.store(mask_ptr + tok + offs, drop.to(tl.uint8), mask=s_in)
        tl.store(order_ptr + tok + slot, offs.to(tl.int64), mask=keep_i != 0)
        count += tl.sum(keep_i, axis=0)
    tl.store(count_ptr + b, count.to(tl.int64))

    # 5. the slots nobody took
    for e0 in range(0, S, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        tl.store(order_ptr + tok + offs, tl.full([BLOCK_E], -1, tl.int64), mask=(offs < S) & (offs >= count))


def config(S: int, M: int, cc: int, triton_version: tuple[int, int] | None = None) -> dict:
    """Chunk sizes (the launcher and the AOT check both call this): a 4096-entry logit tile and 512-token
    vectors at 4 warps, whatever S. Triton < 3.7 (registry.new_tiles): a 2048-entry tile and 32..256-token
    vectors (under triton 3.6, 256 x 16 tiles with 512-token vectors, and 16-token vectors at M 64, spill)."""
    from .registry import new_tiles

    block_m = pow2(M)
    if new_tiles(triton_version) or cc == 0:
        block_t, block_e = max(16, 4096 // block_m), min(512, pow2(S))
    else:
        block_t, block_e = max(16, 2048 // block_m), min(256, pow2(S, lo=32))
    return dict(BLOCK_M=block_m, BLOCK_T=min(block_t, pow2(S)), BLOCK_E=block_e, num_warps=4, num_stages=1)
