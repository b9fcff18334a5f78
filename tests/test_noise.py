"""Perturb mode's fused per-element noise op on every backend (drople_fast/ops/noise.py).

The release multiplies each selected token by ``randn_like(hidden) * sigma + 1``: one
normal per element (release/utils/token_importance.py:173-174, sigma 0.03).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from drople_fast.ops import noise
from drople_fast.ops.backends import BACKENDS

SIGMA = 0.03
TRITON_OK = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _usable(backend: str, device: str = "cpu", dtype=torch.float32) -> bool:
    return BACKENDS[backend].why_not(torch.device(device), dtype) is None


BACKEND_NAMES = [b for b in ("reference", "cpp", "triton") if _usable(b, DEVICE if b == "triton" else "cpu")]


def _inputs(B=3, S=9, D=40, dtype=torch.float32, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=g).to(dtype)
    selected = torch.rand(B, S, generator=g) < p
    return hidden, selected


def _run(backend, hidden, selected, key, sigma=SIGMA, row_stride=0):
    device = DEVICE if backend == "triton" else "cpu"
    out = noise.perturb(hidden.to(device), selected.to(device), key, sigma, row_stride=row_stride, backend=backend)
    return out.cpu()


def test_reference_normals_are_tl_randn_box_muller():
    # The spec written out: c0, c1 of one Philox call -> u1, u2 -> sqrt(-2 log u1) cos(2 pi u2) (tl.randn).
    from drople_fast.ops.philox import philox4x32_words, uniform_from_uint32

    offsets = torch.tensor([0, 1, 2**32 + 5, 2**40 + 123, 7 * 77 * 512 + 3], dtype=torch.int64)
    key = noise.noise_key(-(2**62) + 17)
    c0, c1, _, _ = philox4x32_words(key, offsets)
    u1 = uniform_from_uint32(c0).clamp(min=1e-7)
    u2 = uniform_from_uint32(c1)
    want = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(torch.tensor(6.283185307179586, dtype=torch.float32) * u2)
    assert torch.equal(noise.element_normal(key, offsets), want)


@pytest.mark.skipif(not TRITON_OK, reason="triton missing, or no CUDA and TRITON_INTERPRET is not 1")
def test_reference_matches_tl_randn():
    import triton
    import triton.language as tl

    @triton.jit
    def randn_kernel(out_ptr, off_ptr, seed_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.randn(tl.load(seed_ptr), tl.load(off_ptr + i)))

    n = 1024
    offsets = torch.randint(0, 2**45, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    for key in (0, 12345, noise.noise_key(-7), 2**63 - 1):
        seed = torch.tensor([key], dtype=torch.int64, device=DEVICE)
        got = torch.empty(n, device=DEVICE)
        randn_kernel[(1,)](got, offsets.to(DEVICE), seed, N=n)
        want = noise.element_normal(key, offsets)
        # Same Philox words; log/cos/sqrt are each platform's float32 functions (module docstring).
        torch.testing.assert_close(got.cpu(), want, atol=noise.NORMAL_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row_stride", [0, 13])
def test_identical_across_backends(dtype, row_stride):
    hidden, selected = _inputs(dtype=dtype)
    key = noise.noise_key(987654321)
    ref = _run("reference", hidden, selected, key, row_stride=row_stride)
    assert ref.dtype == dtype
    for backend in BACKEND_NAMES:
        out = _run(backend, hidden, selected, key, row_stride=row_stride)
        assert out.dtype == dtype
        assert torch.equal(out[~selected], hidden[~selected]), backend  # unselected rows untouched
        # factors agree to sigma * NORMAL_ATOL (< 1 float32 ulp of ~1), then one rounding to dtype
        factor_ref = ref[selected].float() / hidden[selected].float()
        factor = out[selected].float() / hidden[selected].float()
        if dtype == torch.float32:
            torch.testing.assert_close(factor, factor_ref, atol=4 * SIGMA * noise.NORMAL_ATOL + 2.5e-7, rtol=0)
        else:  # at most one unit in the last place of the low-precision output apart (the Triton
            # interpreter rounds float32 -> bf16 by truncation, a GPU to nearest)
            want = ref[selected].float()
            ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=1e-3))))
            assert bool(((out[selected].float() - want).abs() <= ulp).all()), backend


def test_per_element_with_the_release_distribution():
    # Every element of a selected token gets its own factor: mean 1, std sigma (release: randn_like * sigma + 1).
    B, S, D = 4, 64, 512
    hidden = torch.ones(B, S, D)
    selected = torch.zeros(B, S, dtype=torch.bool)
    selected[:, ::2] = True
    out = noise.perturb(hidden, selected, noise.noise_key(42), SIGMA)
    factors = out[selected]  # (rows, D)
    n = factors.numel()
    assert torch.equal(out[~selected], hidden[~selected])
    mean, std = float(factors.mean()), float(factors.std())
    assert abs(mean - 1.0) < 6 * SIGMA / n ** 0.5, mean
    assert abs(std - SIGMA) < 6 * SIGMA / (2 * n) ** 0.5, std
    z = (factors - 1.0) / SIGMA
    within_one = float((z.abs() < 1).float().mean())
    assert abs(within_one - 0.682689) < 0.01, within_one
    # per element, not per token: within one row the factor varies over D like across rows
    assert float(factors.std(dim=1).mean()) > 0.9 * SIGMA
    assert float((factors[:, :1] == factors).all(dim=1).float().sum()) == 0
    # neighbouring elements are uncorrelated
    corr = torch.corrcoef(torch.stack([z[:, :-1].flatten(), z[:, 1:].flatten()]))[0, 1]
    assert abs(float(corr)) < 6 / n ** 0.5


def test_key_and_position_change_the_noise_and_trimming_does_not():
    hidden, selected = _inputs(S=9)
    selected[:] = True
    a = noise.perturb(hidden, selected, 1, SIGMA)
    b = noise.perturb(hidden, selected, 2, SIGMA)
    assert not torch.equal(a, b)
    # EOS trimming: the text tower runs on the first S columns of a wider batch and passes the untrimmed
    # width as row_stride, so the draws of the kept columns are those of the untrimmed batch.
    wide = torch.cat([hidden, torch.randn(3, 4, 40)], dim=1)
    wide_sel = torch.cat([selected, torch.ones(3, 4, dtype=torch.bool)], dim=1)
    full = noise.perturb(wide, wide_sel, 5, SIGMA)
    trimmed = noise.perturb(hidden, selected, 5, SIGMA, row_stride=13)
    assert torch.equal(trimmed, full[:, :9])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradient_is_the_same_factor(backend):
    hidden, selected = _inputs()
    device = DEVICE if backend == "triton" else "cpu"
    h = hidden.to(device).requires_grad_()
    key = noise.noise_key(77)
    out = noise.perturb(h, selected.to(device), key, SIGMA, backend=backend)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, h, grad_out)
    factor = (out / h).detach()
    torch.testing.assert_close(grad, grad_out * factor, rtol=2e-6, atol=1e-6)
    assert torch.equal(grad[~selected.to(device)], grad_out[~selected.to(device)])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_opcheck(backend):
    op = noise.noise_op(backend, torch.device(DEVICE if backend == "triton" else "cpu"), torch.float32)
    hidden, selected = _inputs(B=2, S=5, D=8)
    device = DEVICE if backend == "triton" else "cpu"
    args = (hidden.to(device).requires_grad_(), selected.to(device),
            torch.tensor([noise.noise_key(3)], dtype=torch.int64, device=device), SIGMA, 7)
    torch.library.opcheck(op, args)


def test_compiles_without_graph_break():
    hidden, selected = _inputs()

    def f(h, sel, key):
        return noise.perturb(h * 2, sel, key, SIGMA, backend="reference") + 1

    key = torch.tensor([noise.noise_key(11)], dtype=torch.int64)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(hidden, selected, key), f(hidden, selected, key))


@pytest.mark.parametrize("bad, match", [
    (dict(hidden=torch.zeros(2, 3)), "hidden must be"),
    (dict(selected=torch.zeros(2, 3, dtype=torch.int64)), "selected must be bool"),
    (dict(sigma=-0.1), "sigma must be >= 0"),
    (dict(row_stride=2), "row_stride must be 0"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(hidden=torch.zeros(2, 3, 4), selected=torch.zeros(2, 3, dtype=torch.bool), seed=1, sigma=SIGMA,
                row_stride=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        noise.perturb(**args)
