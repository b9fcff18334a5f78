"""Fused IWTD step in one Triton launch (docs/design.md §3).

``iwtd_triton_op`` is the ``drople_fast::iwtd_triton`` custom op with the
fused signature of :mod:`drople_fast.ops.backends`; its semantics are exactly
:func:`drople_fast.ops.reference.iwtd_reference` (float32 math whatever the input
dtype), without ever forming the (B, H, S, S) attention map.

Grid and work split
-------------------
One program per sample (grid = (B,)). Everything IWTD computes is per sample:
the three scores, their normalising sums over C, the min-max of I, the
Bernoulli draws and the prefix sum of the keep mask only ever combine tokens
of the same sample, so no grid-wide reduction (and no second launch, atomic or
grid sync) is needed. Each program runs, in order:

A. the anchor row, per head: an online log-sum-exp over key blocks of
   ``q_a . k_k / sqrt(Dh)`` (allowed keys only), kept as a (BLOCK_H,) register
   vector, then s1 per key block = mean_h exp(logit_ak - m_a) / l_a;
B. s2 per query block: for each head a flash-style sweep over key blocks
   (``tl.dot`` on (BLOCK_Q, BLOCK_DH) x (BLOCK_DH, BLOCK_K) tiles, Dh padded to a
   power of two >= 16 with masks) keeping the online row max m, row sum l and
   the max logit c over keys in C other than the row itself; s2 = mean_h
   exp(c - m) / l (0 when no such key). Causal rows stop at the diagonal block;
C. s3: bridge logits ``folded @ h^T + shift`` (M x S, float32 ``tl.dot`` over
   D chunks) per token block with an online softmax over tokens per bridge
   token, the logits parked in the scratch buffer; then s3 = max_m G[m, j];
D. the per-token epilogue on (BLOCK_S,) register vectors, BLOCK_S = next power
   of two >= S: masks, normalisation by the sums over C, I, min-max, p, the
   Philox draw ``tl.rand(seed, b * row_stride + j)`` (docs/design.md §4), the drop mask, the keep count and
   the keep order (an inclusive ``tl.cumsum`` of the keep mask gives each kept
   token its slot; positions >= count get -1; the two stores hit disjoint
   addresses, so no barrier is needed between them).

Chunk results -> full per-token vectors
---------------------------------------
Stages A-C produce their results one query/key/token block at a time, but
stage D needs them as full (BLOCK_S,) vectors. We *write each chunk to a small
per-sample float32 scratch buffer in global memory, ``tl.debug_barrier()``,
and reload* the full vectors, rather than inserting chunks with a
``where``/``sum`` broadcast: the broadcast costs a (BLOCK_S, BLOCK) register
tile per chunk (64 KiB of fp32 registers per tile at S=512), while the scratch
round trip is 3 x BLOCK_S floats per sample that stay in L1/L2. Each chunk is
written exactly once (the head loop is inside the block loop and accumulates in
registers), so there is no read-modify-write. The same scratch holds the
(BLOCK_M, BLOCK_S) bridge logits between the two s3 passes, so they are
computed once, not twice.

Precision
---------
All softmax / score math is float32. fp32 inputs use ``tl.dot(...,
input_precision="ieee")`` (TF32 would miss the reference's 1e-5). bf16/fp16 q, k
use the native tensor-core dot on GPU: products of two 8/11-bit mantissas are
exact in fp32 and accumulation is fp32, so only the summation order differs
from the reference's ``q.float() @ k.float().T``. The bridge dot always runs in
fp32/IEEE (``folded`` is float32). The interpreter has no bf16 matmul, so under
``TRITON_INTERPRET=1`` tiles are upcast to fp32 first (same values).
``p_max - p_min`` is formed in Python double precision and passed as one fp32,
exactly as the reference's ``normalised * (p_max - p_min)`` does.

Expected cost on an H200 (not yet measured)
-------------------------------------------
Per sample and layer (ViT-B/16: S=201, H=12, Dh=64, M=64, D=768): stage B is
~2 * 256^2 * 64 * 12 ~ 100 MFLOP of padded bf16 tensor-core dot (about half an
attention forward, as docs/design.md §3 says), stage C ~ 2 * 64 * 256 * 768 ~ 25 MFLOP
of fp32 FMA dot, A and D are O(H * S * Dh) and O(S). One SM therefore needs
roughly 15-30 us for stage B and ~50 us for stage C, so a layer costs about
50-100 us whatever the batch as long as B <= 132 (one program per SM); with the
few-shot batch of 4 most SMs are idle. fp32 q/k take the IEEE (FMA, no tensor
core) path in stage B, ~200 us per layer; run under bf16/fp16 autocast for
speed. If this shows up in profiles, the next step is a (B, H) grid for stage B
(needs a second tiny launch or atomics for the head mean) and a bf16x3 split of
the bridge dot. Text (S=77, B = number of classes) fills the machine. The
scratch buffer is (B, (3 + BLOCK_M) * BLOCK_S) fp32, e.g. 34 MB for 1000 text
prompts at S=77; recomputing the bridge logits instead would trade that memory
for twice the stage C work. 4 warps with 64-wide blocks keep the (64, 64) fp32
logit tile at 32 registers per thread; 2 pipeline stages suffice for the short
key loops.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..library import fused_fake

_MAX_BRIDGE_TOKENS = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _iwtd_fused_kernel(
    q_ptr, k_ptr, h_ptr, elig_ptr, valid_ptr, anchor_ptr, folded_ptr, shift_ptr, seed_ptr, row_stride,
    imp_ptr, prob_ptr, mask_ptr, count_ptr, order_ptr, scratch_ptr,
    S, H, DH, D, M,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_hb, stride_hs,
    stride_fm,
    sm_scale, p_max, p_range, inv_h,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DH: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per sample; see the module docstring for why no cross-program reduction is needed.
    b = tl.program_id(0).to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")

    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    h_base = h_ptr + b * stride_hb
    tok_base = b * S  # eligible / valid / outputs are contiguous (B, S)
    # scratch per sample: [s1 | s2 | s3 | bridge logits (BLOCK_M x BLOCK_S)]
    scr = scratch_ptr + b * ((3 + BLOCK_M) * BLOCK_S)

    a = tl.load(anchor_ptr + b)
    offs_d = tl.arange(0, BLOCK_DH)
    d_ok = offs_d < DH
    offs_hv = tl.arange(0, BLOCK_H)

    # ---------------- A. anchor row: log-sum-exp per head, then s1 ----------------
    m_a = tl.zeros([BLOCK_H], dtype=tl.float32)
    l_a = tl.full([BLOCK_H], 1.0, tl.float32)
    for h in range(H):
        qa = tl.load(q_base + h * stride_qh + a * stride_qs + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        m_run = tl.max(tl.full([BLOCK_K], NEG_INF, tl.float32), axis=0)
        l_run = tl.sum(tl.zeros([BLOCK_K], dtype=tl.float32), axis=0)
        for k0 in range(0, S, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < S
            kt = tl.load(k_base + h * stride_kh + offs_k[:, None] * stride_ks + offs_d[None, :],
                         mask=k_in[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            logit = tl.sum(kt * qa[None, :], axis=1) * sm_scale
            allowed = (tl.load(valid_ptr + tok_base + offs_k, mask=k_in, other=0) != 0) & k_in
            if CAUSAL:
                allowed = allowed & (offs_k <= a)
            logit = tl.where(allowed, logit, NEG_INF)
            m_new = tl.maximum(m_run, tl.max(logit, axis=0))
            m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
            l_run = l_run * tl.exp(m_run - m_use) + tl.sum(tl.exp(logit - m_use), axis=0)
            m_run = m_new
        m_a = tl.where(offs_hv == h, m_run, m_a)
        l_a = tl.where(offs_hv == h, l_run, l_a)

    for k0 in range(0, S, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < S
        allowed = (tl.load(valid_ptr + tok_base + offs_k, mask=k_in, other=0) != 0) & k_in
        if CAUSAL:
            allowed = allowed & (offs_k <= a)
        acc1 = tl.zeros([BLOCK_K], dtype=tl.float32)
        for h in range(H):
            qa = tl.load(q_base + h * stride_qh + a * stride_qs + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            kt = tl.load(k_base + h * stride_kh + offs_k[:, None] * stride_ks + offs_d[None, :],
                         mask=k_in[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            logit = tl.sum(kt * qa[None, :], axis=1) * sm_scale
            mh = tl.sum(tl.where(offs_hv == h, m_a, 0.0), axis=0)
            lh = tl.sum(tl.where(offs_hv == h, l_a, 0.0), axis=0)
            acc1 += tl.where(allowed, tl.exp(logit - mh) / lh, 0.0)
        tl.store(scr + offs_k, acc1 * inv_h, mask=k_in)

    # ---------------- B. s2: flash-style sweep, per query block ----------------
    for q0 in range(0, S, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_in = offs_q < S
        if CAUSAL:
            k_hi = tl.minimum(S, q0 + BLOCK_Q)  # keys after the block's last row are never allowed
        else:
            k_hi = S
        acc2 = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for h in range(H):
            qt = tl.load(q_base + h * stride_qh + offs_q[:, None] * stride_qs + offs_d[None, :],
                         mask=q_in[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                qt = qt.to(tl.float32)
            m_i = tl.full([BLOCK_Q], NEG_INF, tl.float32)
            l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
            c_i = tl.full([BLOCK_Q], NEG_INF, tl.float32)
            for k0 in range(0, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_in = offs_k < S
                kt = tl.load(k_base + h * stride_kh + offs_k[:, None] * stride_ks + offs_d[None, :],
                             mask=k_in[:, None] & d_ok[None, :], other=0.0)
                if DOT_FP32:
                    s = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
                else:
                    s = tl.dot(qt, tl.trans(kt))
                s = s * sm_scale
                key_valid = (tl.load(valid_ptr + tok_base + offs_k, mask=k_in, other=0) != 0) & k_in
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
            acc2 += tl.where(has_c, tl.exp(tl.where(has_c, c_i, 0.0) - m_fin) / l_pos, 0.0)
        tl.store(scr + BLOCK_S + offs_q, acc2 * inv_h, mask=q_in)

    # ---------------- C. s3: softmax over tokens of folded @ h^T + shift ----------------
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    shift = tl.load(shift_ptr + offs_m, mask=m_ok, other=0.0)
    offs_dd = tl.arange(0, BLOCK_D)
    g_base = scr + 3 * BLOCK_S
    mx = tl.full([BLOCK_M], NEG_INF, tl.float32)
    sm = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t0 in range(0, S, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < S
        logits = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_dd
            dd_ok = dd < D
            f = tl.load(folded_ptr + offs_m[:, None] * stride_fm + dd[None, :],
                        mask=m_ok[:, None] & dd_ok[None, :], other=0.0)
            ht = tl.load(h_base + offs_t[:, None] * stride_hs + dd[None, :],
                         mask=t_in[:, None] & dd_ok[None, :], other=0.0).to(tl.float32)
            logits = tl.dot(f, tl.trans(ht), logits, input_precision="ieee")
        logits = logits + shift[:, None]
        tok_valid = (tl.load(valid_ptr + tok_base + offs_t, mask=t_in, other=0) != 0) & t_in
        logits = tl.where(tok_valid[None, :], logits, NEG_INF)
        tl.store(g_base + offs_m[:, None] * BLOCK_S + offs_t[None, :], logits)
        m_new = tl.maximum(mx, tl.max(logits, axis=1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        sm = sm * tl.exp(mx - m_use) + tl.sum(tl.exp(logits - m_use[:, None]), axis=1)
        mx = m_new
    tl.debug_barrier()  # the parked logits are re-read below with the same tiling
    mx_use = tl.where(mx == NEG_INF, 0.0, mx)
    sm_pos = tl.where(sm > 0.0, sm, 1.0)
    for t0 in range(0, S, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < S
        logits = tl.load(g_base + offs_m[:, None] * BLOCK_S + offs_t[None, :])
        g = tl.exp(logits - mx_use[:, None]) / sm_pos[:, None]
        g = tl.where(m_ok[:, None], g, 0.0)  # G >= 0, so 0 never wins a max over real rows
        tl.store(scr + 2 * BLOCK_S + offs_t, tl.max(g, axis=0), mask=t_in)

    # ---------------- D. per-token epilogue on (BLOCK_S,) register vectors ----------------
    tl.debug_barrier()  # scores were written chunk by chunk, possibly by other threads
    offs = tl.arange(0, BLOCK_S)
    s_in = offs < S
    valid = (tl.load(valid_ptr + tok_base + offs, mask=s_in, other=0) != 0) & s_in
    content = valid & (offs != a)
    elig = (tl.load(elig_ptr + tok_base + offs, mask=s_in, other=0) != 0) & content

    s1 = tl.where(content, tl.load(scr + offs), 0.0)
    s2 = tl.where(content, tl.load(scr + BLOCK_S + offs), 0.0)
    s3 = tl.where(content, tl.load(scr + 2 * BLOCK_S + offs), 0.0)
    n1 = s1 / (tl.sum(s1, axis=0) + 1e-8)
    n2 = s2 / (tl.sum(s2, axis=0) + 1e-8)
    n3 = s3 / (tl.sum(s3, axis=0) + 1e-8)
    imp = (n1 + n2 + n3) / 3.0

    lo = tl.min(tl.where(content, imp, float("inf")), axis=0)
    hi = tl.max(tl.where(content, imp, NEG_INF), axis=0)
    span = hi - lo
    span = tl.where(span > 0.0, span, 1.0)
    normed = (imp - lo) / span
    prob = tl.where(elig, p_max - normed * p_range, 0.0)

    seed = tl.load(seed_ptr)
    u = tl.rand(seed, b.to(tl.int64) * row_stride + offs.to(tl.int64))
    drop = elig & (u < prob)
    keep = valid & ~drop
    keep_i = keep.to(tl.int32)
    count = tl.sum(keep_i, axis=0)
    slot = tl.cumsum(keep_i, axis=0) - 1  # prefix sum: kept token j goes to slot #kept before j

    tl.store(imp_ptr + tok_base + offs, imp, mask=s_in)
    tl.store(prob_ptr + tok_base + offs, prob, mask=s_in)
    tl.store(mask_ptr + tok_base + offs, drop.to(tl.uint8), mask=s_in)
    tl.store(count_ptr + b, count.to(tl.int64))
    # disjoint addresses: slots [0, count) receive kept positions, [count, S) receive -1
    tl.store(order_ptr + tok_base + slot, offs.to(tl.int64), mask=keep)
    tl.store(order_ptr + tok_base + offs, tl.full([BLOCK_S], -1, tl.int64), mask=s_in & (offs >= count))


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


_NUM_WARPS, _NUM_STAGES = 4, 2


def _blocks(S, H, Dh, M, D) -> dict:
    """Block sizes of the launch (shared with :func:`aot_configs`, so the AOT check compiles what runs)."""
    BLOCK_S = _pow2(S)
    BLOCK_M = _pow2(M)
    return dict(BLOCK_S=BLOCK_S, BLOCK_Q=min(64, BLOCK_S), BLOCK_K=min(64, BLOCK_S), BLOCK_DH=_pow2(Dh),
                BLOCK_H=_pow2(H, lo=2), BLOCK_M=BLOCK_M, BLOCK_T=min(64, BLOCK_S),
                BLOCK_D=min(64 if BLOCK_M <= 64 else 32, _pow2(D)))


def aot_configs(point, cc: int) -> list:
    """The launch configuration of :func:`iwtd_triton_launch` for a matrix point (see ops/aot.py)."""
    from .registry import KernelConfig, signature_for

    consts = dict(CAUSAL=point.causal, DOT_FP32=point.dtype == "fp32",
                  **_blocks(point.S, point.H, point.Dh, point.M, point.D))
    fn = _iwtd_fused_kernel
    ptrs = dict(q_ptr=point.dtype, k_ptr=point.dtype, h_ptr=point.dtype, elig_ptr="u8", valid_ptr="u8",
                anchor_ptr="i64", folded_ptr="fp32", shift_ptr="fp32", seed_ptr="i64", imp_ptr="fp32",
                prob_ptr="fp32", mask_ptr="u8", count_ptr="i64", order_ptr="i64", scratch_ptr="fp32")
    sig = signature_for(fn, ptrs, consts, floats=("sm_scale", "p_max", "p_range", "inv_h"))
    return [KernelConfig("iwtd_fused", fn, sig, tuple(consts.items()), _NUM_WARPS, _NUM_STAGES)]


def iwtd_triton_launch(q, k, hidden, eligible, valid, anchor, folded, shift, causal, p_min, p_max, seed,
                       row_stride=0):
    """Allocate outputs and launch :func:`_iwtd_fused_kernel` once (grid = (B,))."""
    B, H, S, Dh = q.shape
    D = hidden.shape[2]
    M = folded.shape[0]
    if M > _MAX_BRIDGE_TOKENS:
        raise ValueError(f"the triton IWTD kernel holds all bridge tokens in one block; M={M} > "
                         f"{_MAX_BRIDGE_TOKENS}")
    device = q.device
    q = q.contiguous()
    k = k.contiguous()
    hidden = hidden.contiguous()
    folded = folded.to(torch.float32).contiguous()
    shift = shift.to(torch.float32).contiguous()
    eligible_u8 = eligible.contiguous().view(torch.uint8)
    valid_u8 = valid.contiguous().view(torch.uint8)
    anchor = anchor.to(torch.int64).contiguous()
    seed = seed.to(torch.int64).reshape(1).contiguous()

    importance = torch.empty(B, S, dtype=torch.float32, device=device)
    drop_prob = torch.empty(B, S, dtype=torch.float32, device=device)
    drop_mask = torch.empty(B, S, dtype=torch.bool, device=device)
    keep_count = torch.empty(B, dtype=torch.int64, device=device)
    keep_order = torch.empty(B, S, dtype=torch.int64, device=device)
    if B == 0:
        return importance, drop_prob, drop_mask, keep_count, keep_order

    blocks = _blocks(S, H, Dh, M, D)
    BLOCK_S, BLOCK_M = blocks["BLOCK_S"], blocks["BLOCK_M"]
    scratch = torch.empty(B, (3 + BLOCK_M) * BLOCK_S, dtype=torch.float32, device=device)
    dot_fp32 = _interpreting() or q.dtype == torch.float32
    p_range = float(p_max) - float(p_min)  # double, rounded once to fp32, as in the reference

    _iwtd_fused_kernel[(B,)](
        q, k, hidden, eligible_u8, valid_u8, anchor, folded, shift, seed, row_stride if row_stride > 0 else S,
        importance, drop_prob, drop_mask.view(torch.uint8), keep_count, keep_order, scratch,
        S, H, Dh, D, M,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        hidden.stride(0), hidden.stride(1),
        folded.stride(0),
        1.0 / (Dh ** 0.5), float(p_max), p_range, 1.0 / H,
        CAUSAL=bool(causal), DOT_FP32=dot_fp32,
        **blocks, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return importance, drop_prob, drop_mask, keep_count, keep_order


@torch.library.custom_op("drople_fast::iwtd_triton", mutates_args=())
def iwtd_triton_op(
    q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor, eligible: torch.Tensor, valid: torch.Tensor,
    anchor: torch.Tensor, folded: torch.Tensor, shift: torch.Tensor, causal: bool, p_min: float,
    p_max: float, seed: torch.Tensor, row_stride: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused IWTD (backends.py signature): (importance, drop_prob, drop_mask, keep_count, keep_order)."""
    return iwtd_triton_launch(q, k, hidden, eligible, valid, anchor, folded, shift, causal, p_min, p_max, seed,
                              row_stride)


iwtd_triton_op.register_fake(fused_fake)
