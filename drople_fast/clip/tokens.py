"""Token bookkeeping that survives compaction: padding, anchor, prompt positions.

A tower's sequence is always laid out as ``[anchor-prefix, prompts, rest]``:
vision ``[CLS, P_1..P_n, patches]`` and text ``[SOS, ctx_1..ctx_n, words, EOS,
pad]``. Compaction keeps the original order, so surviving prompts stay right
after position 0 and a layer's new prompts always go in at position 1. The
vision anchor (CLS) stays at 0; the text anchor (EOS) is tracked per sample.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..ops import library
from ..ops.primitives import keep_order


@dataclass
class Tokens:
    x: torch.Tensor  # (B, S, D)
    valid: torch.Tensor  # (B, S) bool, False = padding
    prompt: torch.Tensor  # (B, S) bool, positions holding prompt tokens
    eligible: torch.Tensor  # (B, S) bool, IWTD may drop these (prompts are added on insertion)
    anchor: torch.Tensor  # (B,) int64
    num_prompts: int = 0  # prompts in the layout when every sample has them all at 1..num_prompts
    scattered: bool = False  # some prompts were dropped, so prompt positions differ per sample
    padded: bool = False  # some position may be padding
    free_eligible: bool = False  # text without a prompt learner: word tokens are eligible
    # Positions cut by EOS trimming that the untrimmed tower would still carry; random draws use
    # the untrimmed row stride so trimming never changes them. A data-dependent compaction
    # gives both the same width, which ends the difference.
    trimmed: int = 0
    # Per-sample valid lengths when known on the host without a sync (valid rows are always a prefix:
    # compaction keeps order and prompts go in at 1). Carried from the one count a "drop" layer reads
    # anyway, so the per-token layers run on the real rows, and packed attention gets its sequence
    # lengths, without another sync.
    lengths: Optional[tuple[int, ...]] = None

    @property
    def real(self) -> Optional[int]:
        """Number of valid rows, if known on the host."""
        return None if self.lengths is None else sum(self.lengths)

    def _shifted(self, n: int) -> Optional[tuple[int, ...]]:
        return None if self.lengths is None else tuple(length + n for length in self.lengths)

    @property
    def row_stride(self) -> int:
        """Philox row stride for this layout (0 = the current length)."""
        return self.length + self.trimmed if self.trimmed else 0

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def gather(self, index: torch.Tensor, prompts_removed: bool, padded: bool,
               lengths: Optional[tuple[int, ...]] = None) -> "Tokens":
        """Keep the positions in ``index`` (B, K), -1 = padding; flags follow their tokens.

        ``prompts_removed``: the index drops every prompt; otherwise the surviving
        prompts may now sit at different positions per sample. ``lengths``: the number of
        entries >= 0 in each row of ``index`` if the caller knows them (else unknown).
        """
        ok = index >= 0
        safe = index.clamp(min=0)
        pick = lambda t: torch.gather(t, 1, safe) & ok  # noqa: E731
        anchor = (index == self.anchor[:, None]).to(torch.int64).argmax(dim=1)
        scattered = not prompts_removed and (self.num_prompts > 0 or self.scattered)
        return replace(self, x=library.gather_tokens(self.x, index), valid=pick(self.valid), prompt=pick(self.prompt),
                       eligible=pick(self.eligible), anchor=anchor, padded=self.padded or padded,
                       num_prompts=0, scattered=scattered, lengths=lengths)

    def keep(self, keep: torch.Tensor, prompts_removed: bool = False) -> "Tokens":
        """Keep the positions where ``keep`` (B, S) is True (data-dependent width, so padded).

        One host sync: the kept counts of all samples are read together.
        """
        order, count = keep_order(keep)
        lengths = tuple(count.tolist())
        return self.keep_index(order[:, : max(lengths, default=0)], prompts_removed, lengths=lengths)

    def keep_index(self, index: torch.Tensor, prompts_removed: bool = False,
                   lengths: Optional[tuple[int, ...]] = None) -> "Tokens":
        """Gather a compaction index whose width is the largest kept count (trimmed or not alike)."""
        return replace(self.gather(index, prompts_removed, padded=True, lengths=lengths), trimmed=0)

    def without_prompts(self) -> "Tokens":
        """Remove the prompt tokens (before the next layer supplies its own)."""
        if self.num_prompts == 0 and not self.scattered:
            return self
        if not self.scattered:
            n = self.num_prompts
            cut = lambda t: torch.cat([t[:, :1], t[:, 1 + n:]], dim=1)  # noqa: E731
            anchor = torch.where(self.anchor > 0, self.anchor - n, self.anchor)
            return replace(self, x=cut(self.x), valid=cut(self.valid), prompt=cut(self.prompt),
                           eligible=cut(self.eligible), anchor=anchor, num_prompts=0, lengths=self._shifted(-n))
        return self.keep(self.valid & ~self.prompt, prompts_removed=True)

    def anchors_only(self, rows: torch.Tensor) -> "Tokens":
        """The anchors' rows (B, D) as a one-token layout (what a tower's pooling reads after its last block)."""
        B = rows.shape[0]
        one = torch.ones(B, 1, dtype=torch.bool, device=rows.device)
        return replace(self, x=rows[:, None], valid=one, prompt=~one, eligible=~one,
                       anchor=torch.zeros(B, dtype=torch.int64, device=rows.device), num_prompts=0,
                       scattered=False, padded=False, free_eligible=False, trimmed=0, lengths=(1,) * B)

    def with_prompts(self, prompts: torch.Tensor) -> "Tokens":
        """Insert (1 or B, n, D) prompts at position 1, replacing any prompts present; they are eligible."""
        base = self.without_prompts()
        B, n = base.batch, prompts.shape[1]
        prompts = prompts.to(base.x.dtype).expand(B, -1, -1)
        flag = lambda value: torch.full((B, n), value, dtype=torch.bool, device=base.x.device)  # noqa: E731
        join = lambda t, mid: torch.cat([t[:, :1], mid, t[:, 1:]], dim=1)  # noqa: E731
        anchor = torch.where(base.anchor > 0, base.anchor + n, base.anchor)
        return replace(base, x=join(base.x, prompts), valid=join(base.valid, flag(True)),
                       prompt=join(base.prompt, flag(True)), eligible=join(base.eligible, flag(True)),
                       anchor=anchor, num_prompts=n, lengths=base._shifted(n))


def start(x: torch.Tensor, eligible: torch.Tensor, anchor: torch.Tensor, valid: Optional[torch.Tensor] = None,
          prompt: Optional[torch.Tensor] = None, num_prompts: int = 0,
          lengths: Optional[tuple[int, ...]] = None) -> Tokens:
    """``lengths``: the per-sample valid lengths if ``valid`` is given and the caller knows them."""
    B, S, _ = x.shape
    full = torch.ones(B, S, dtype=torch.bool, device=x.device)
    return Tokens(x=x, valid=full if valid is None else valid, prompt=torch.zeros_like(full) if prompt is None else prompt,
                  eligible=eligible.expand(B, S), anchor=anchor, num_prompts=num_prompts,
                  padded=valid is not None, lengths=(S,) * B if valid is None else lengths)
