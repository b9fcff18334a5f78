"""Attention scores s1/s2 per head over a (query block, head, sample) grid, without the S x S map.

Writes per-head partials ``part[b, 0, h, j]`` = A[h, anchor, j] (s1 before the head mean) and
``part[b, 1, h, j]`` = max over keys k in C, k != j of A[h, j, k] (s2 before the head mean); the head
mean is taken later by the epilogue in a fixed order, so the result is deterministic (no atomics).

Programs ``0 .. n_q - 1`` of axis 0 each own BLOCK_Q query rows of one head: a flash-style sweep over
key blocks (``tl.dot`` on (BLOCK_Q, BLOCK_DH) x (BLOCK_DH, BLOCK_K) tiles, Dh padded to a power of
two >= 16 with masks) keeps the online row max m, row sum l and the max logit c over keys in C other
than the row; s2 = exp(c - m) / l (0 when no such key). Causal rows stop at the diagonal block.
Program ``n_q`` computes the anchor row of its head: its log-sum-exp over allowed keys, then its
probabilities for every key (the anchor row is one row: a vector sweep, no tensor core).

Precision: softmax math is float32. bf16/fp16 q, k go through the tensor cores: a product of two 8- or
11-bit mantissas is exact in fp32 and accumulation is fp32, so only the summation order differs from
the reference's ``q.float() @ k.float().T``. fp32 q, k use ``input_precision="ieee"`` (TF32 would
miss the reference's 1e-5). Triton's interpreter computes bf16 ``tl.dot`` wrongly (its fp16 one is
right), so under ``TRITON_INTERPRET=1`` bf16 tiles are upcast to fp32 (same values, exact products);
fp16 runs the tensor-core code path there too, which is how the tests cover it.
"""
from __future__ import annotations

import triton
import triton.language as tl

NUM_STAGES = 2


@triton.jit
def _anchor_logits(k_base, stride_ks, valid_base, qa, offs_d, d_ok, a, a_ok, k0, S, sm_scale,
                   CAUSAL: tl.constexpr, BLOCK_K: tl.constexpr):
    """The anchor row's logits over keys ``k0 .. k0 + BLOCK_K`` and which of them are allowed (valid,
    in range, causal): shared by its log-sum-exp sweep and its probability sweep."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_in = offs_k < S
    kt = tl.load(k_base + offs_k[:, None] * stride_ks + offs_d[None, :],
                 mask=k_in[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    logit = tl.sum(kt * qa[None, :], axis=1) * sm_scale
    allowed = (tl.load(valid_base + offs_k, mask=k_in, other=0) != 0) & k_in & a_ok
    if CAUSAL:
        allowed = allowed & (offs_k <= a)
    return offs_k, k_in, logit, allowed


@triton.jit(do_not_specialize=["S", "stride_qb", "stride_qh", "stride_kb", "stride_kh"])
def _scores_kernel(
    q_ptr, k_ptr, valid_ptr, anchor_ptr, part_ptr,
    S, H, DH,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    sm_scale,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    n_q = tl.cdiv(S, BLOCK_Q)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    valid_base = valid_ptr + b * S
    # part is (B, 2, H, S) float32, contiguous
    part_s1 = part_ptr + ((b * 2 + 0) * H + h) * S
    part_s2 = part_ptr + ((b * 2 + 1) * H + h) * S
    offs_d = tl.arange(0, BLOCK_DH)
    d_ok = offs_d < DH
    a = tl.load(anchor_ptr + b)
    a_ok = (a >= 0) & (a < S)  # validated on the host; guarded here too (torch.compile skips value checks)

    if pid == n_q:
        # ---- the anchor row of this head: log-sum-exp, then probabilities for every key ----
        qa = tl.load(q_base + a * stride_qs + offs_d, mask=d_ok & a_ok, other=0.0).to(tl.float32)
        m_run = tl.max(tl.full([BLOCK_K], NEG_INF, tl.float32), axis=0)
        l_run = tl.sum(tl.zeros([BLOCK_K], dtype=tl.float32), axis=0)
        for k0 in range(0, S, BLOCK_K):
            offs_k, k_in, logit, allowed = _anchor_logits(k_base, stride_ks, valid_base, qa, offs_d, d_ok, a, a_ok,
                                                          k0, S, sm_scale, CAUSAL, BLOCK_K)
            logit = tl.where(allowed, logit, NEG_INF)
            m_new = tl.maximum(m_run, tl.max(logit, axis=0))
            m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
            l_run = l_run * tl.exp(m_run - m_use) + tl.sum(tl.exp(logit - m_use), axis=0)
            m_run = m_new
        ma_fin = tl.where(m_run == NEG_INF, 0.0, m_run)
        la_pos = tl.where(l_run > 0.0, l_run, 1.0)
        for k0 in range(0, S, BLOCK_K):
            offs_k, k_in, logit, allowed = _anchor_logits(k_base, stride_ks, valid_base, qa, offs_d, d_ok, a, a_ok,
                                                          k0, S, sm_scale, CAUSAL, BLOCK_K)
            tl.store(part_s1 + offs_k, tl.where(allowed, tl.exp(logit - ma_fin) / la_pos, 0.0), mask=k_in)
    else:
        # ---- s2 for BLOCK_Q query rows of this head ----
        q0 = pid * BLOCK_Q
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_in = offs_q < S
        if CAUSAL:
            k_hi = tl.minimum(S, q0 + BLOCK_Q)  # keys after the block's last row are never allowed
        else:
            k_hi = S
        qt = tl.load(q_base + offs_q[:, None] * stride_qs + offs_d[None, :],
                     mask=q_in[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            qt = qt.to(tl.float32)
        m_i = tl.full([BLOCK_Q], NEG_INF, tl.float32)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
        c_i = tl.full([BLOCK_Q], NEG_INF, tl.float32)
        for k0 in range(0, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < S
            kt = tl.load(k_base + offs_k[:, None] * stride_ks + offs_d[None, :],
                         mask=k_in[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                s = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(qt, tl.trans(kt))
            s = s * sm_scale
            key_valid = (tl.load(valid_base + offs_k, mask=k_in, other=0) != 0) & k_in
            allowed = key_valid[None, :] & q_in[:, None]
            if CAUSAL:
                allowed = allowed & (offs_k[None, :] <= offs_q[:, None])
            s = tl.where(allowed, s, NEG_INF)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), axis=1)
            m_i = m_new
            in_c = allowed & (offs_k[None, :] != a) & (offs_k[None, :] != offs_q[:, None])
            c_i = tl.maximum(c_i, tl.max(tl.where(in_c, s, NEG_INF), axis=1))
        has_c = c_i > NEG_INF  # implies l_i > 0 and m_i finite
        m_fin = tl.where(has_c, m_i, 0.0)
        l_pos = tl.where(has_c, l_i, 1.0)
        s2 = tl.where(has_c, tl.exp(tl.where(has_c, c_i, 0.0) - m_fin) / l_pos, 0.0)
        tl.store(part_s2 + offs_q, s2, mask=q_in)


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def config(dtype: str, S: int, Dh: int, cc: int, triton_version: tuple[int, int] | None = None) -> dict:
    """Block sizes and warps per architecture and Triton version (the launcher and the AOT check both call this).

    fp32 tiles take the FMA path (no tensor core), whose operands are replicated across threads:
    32 x 16 tiles keep them in registers at Dh 128 (32 x 32 spilled on sm_90). bf16/fp16 use tensor-core
    tiles: 64 x 64 on sm_90 (wgmma, ~120 registers), 64 query x 32 key rows on sm_80 and older, where
    64 x 64 mma.sync tiles reach ~230 registers at Dh 128 (no spill, but no headroom either).
    Triton < 3.7 (registry.new_tiles): 64 x 64 reaches 250-255 registers on sm_90, so 64 x 32 there too,
    and the query tile is never shrunk to a short S (16-row fp32 and 32 x 32 tensor-core tiles spill 4-16
    bytes at Dh 128 under triton 3.6). ``python -m drople_fast.ops.aot`` checks every choice.
    """
    from .registry import new_tiles

    new = new_tiles(triton_version)
    if dtype == "fp32":
        block_q, block_k = 32, 16
    elif cc == 0 or (cc >= 90 and new):  # 0: not a GPU (interpreter): any valid choice
        block_q, block_k = 64, 64
    else:
        block_q, block_k = 64, 32
    if new or cc == 0:
        block_q = min(block_q, pow2(S))
    return dict(BLOCK_Q=block_q, BLOCK_K=min(block_k, pow2(S)), BLOCK_DH=pow2(Dh), num_warps=4,
                num_stages=NUM_STAGES)


def grid(B: int, H: int, S: int, block_q: int) -> tuple:
    return (triton.cdiv(S, block_q) + 1, H, B)  # + 1: the anchor-row program of each head
