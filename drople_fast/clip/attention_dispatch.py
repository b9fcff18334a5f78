"""Which attention implementation runs a padded (B, H, S, Dh) problem: a measured table, not a guess.

The CPU's fused SDPA kernel (flash) is fast on the vision tower's few long sequences but its bf16
backward pays a large fixed cost per (sample, head) -- hundreds of ms for the text tower's
thousands of short prompts -- where a plain matmul / softmax / matmul is several times faster.
Which one wins depends on the machine, the dtype and the shape, so the choice is read from
:mod:`drople_fast.clip.attention_table`, written by ``bench/bench_attention_dispatch.py`` on the
machine it describes (one entry list per device key, e.g. ``cpu-AVX512``; a Python module, so every
install ships it). A device with no entries keeps
torch's own choice (``"sdpa"``): the behaviour before this table existed.

Candidates (all compute the same softmax attention; ``test_attention_dispatch.py`` checks each
against float64):

* ``sdpa``: ``F.scaled_dot_product_attention`` as torch dispatches it (CPU: the fused flash kernel);
* ``math``: the same call restricted to ``SDPBackend.MATH``;
* ``explicit``: ``softmax(q k^T / sqrt(d) + mask) v`` written out, scores and products in the input
  dtype, softmax in float32 (autograd differentiates the matmuls);
* ``sdpa_fp32``: low-precision inputs upcast to float32 for ``sdpa`` and the result cast back.

Packed (variable-length) attention is chosen apart from this table, where the layout allows it
(:func:`drople_fast.clip.attention.packed_kernel`: CUDA, fp16/bf16, lengths known on the host).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

DEFAULT = "sdpa"


def _sdpa(q, k, v, mask, causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _math(q, k, v, mask, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _explicit(q, k, v, mask, causal):
    S, L = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril() if mask is None else \
            mask & torch.ones(S, L, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)


def _sdpa_fp32(q, k, v, mask, causal):
    if q.dtype not in (torch.float16, torch.bfloat16):
        return _sdpa(q, k, v, mask, causal)
    # autocast lists SDPA as a low-precision op: without this it would recast the inputs down again
    with torch.autocast(q.device.type, enabled=False):
        return _sdpa(q.float(), k.float(), v.float(), mask, causal).to(q.dtype)


IMPLEMENTATIONS = {"sdpa": _sdpa, "math": _math, "explicit": _explicit, "sdpa_fp32": _sdpa_fp32}


def device_key(device: torch.device) -> str:
    """The table's key for ``device``: the CPU's ATen capability, or the CUDA device's name."""
    if device.type == "cpu":
        return f"cpu-{torch.backends.cpu.get_cpu_capability()}"
    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device)}"
    return device.type


def check_table(devices: dict, where: str = "attention table") -> dict:
    """``devices`` ({device key: [entry, ...]}) if every entry is well formed and names known implementations."""
    fields = {"dtype", "batch_heads", "seq", "causal", "masked", "ms", "best"}
    for key, entries in devices.items():
        for e in entries:
            missing = fields - set(e)
            if missing:
                raise ValueError(f"{where}: an entry of {key} lacks {sorted(missing)}")
            unknown = [n for n in (*e["ms"], e["best"]) if n not in IMPLEMENTATIONS]
            if unknown:
                raise ValueError(f"{where}: {key} names unknown attention implementations {unknown}")
    return devices


_table: Optional[dict] = None


def table() -> dict:
    """{device key: [entry, ...]}: each entry names its problem, every candidate's time (ms) and the best."""
    global _table
    if _table is None:
        from .attention_table import DEVICES

        _table = check_table(DEVICES, "drople_fast/clip/attention_table.py")
    return _table


def set_table(devices: Optional[dict]) -> None:
    """Use ``devices`` instead of the committed table (None: back to the committed one)."""
    global _table
    _table = None if devices is None else check_table(devices)
    _choose.cache_clear()


def nearest(entries: list, dtype: str, batch_heads: int, seq: int, causal: bool, masked: bool) -> Optional[dict]:
    """The measured entry of the same dtype / causal / masked kind closest in (log batch*heads, log seq)."""
    same = [e for e in entries if e["dtype"] == dtype and e["causal"] == causal and e["masked"] == masked]
    if not same:
        return None
    dist = lambda e: (math.log2(e["batch_heads"] / batch_heads) ** 2 + math.log2(e["seq"] / seq) ** 2)  # noqa: E731
    return min(same, key=dist)


@functools.lru_cache(maxsize=4096)
def _choose(key: str, dtype: str, batch_heads: int, seq: int, causal: bool, masked: bool) -> str:
    entry = nearest(table().get(key, []), dtype, batch_heads, seq, causal, masked)
    return DEFAULT if entry is None else entry["best"]


def choose(q: torch.Tensor, mask: Optional[torch.Tensor], causal: bool) -> str:
    """The implementation the table picks for attention on ``q`` (B, H, S, Dh) with this mask kind."""
    if torch.compiler.is_compiling():
        # inside a torch.compile trace the compiler picks the kernel (and the table's lookups -- the
        # CPU's capability string, host-side shape arithmetic -- cannot be traced): torch's own SDPA
        return DEFAULT
    B, H, S, _ = q.shape
    return _choose(device_key(q.device), str(q.dtype).removeprefix("torch."), max(B * H, 1), max(S, 1),
                   bool(causal), mask is not None)


def attention(q, k, v, mask: Optional[torch.Tensor], causal: bool, impl: Optional[str] = None):
    """Softmax attention by ``impl`` (default: the table's choice for this device, dtype and shape)."""
    name = choose(q, mask, causal) if impl is None else impl
    return IMPLEMENTATIONS[name](q, k, v, mask, causal)
