"""End-to-end training-step throughput of a ViT-B/16 CLIP with drople_fast (pytest-benchmark).

    python -m pytest bench/bench_e2e.py --benchmark-only --benchmark-json=bench/results/e2e.json
    python bench/report_e2e.py bench/results/e2e.json        # Markdown table + CSV

Image tower at 224 px, forward + backward, frozen backbone; the gradients go to
4 deep visual prompt tokens (layers 0-5, supplied through a PromptHook) and to
the bridge module. Batch 8 on CPU, 32 on GPU (BENCH_BATCH overrides). Cases:

* ``unpatched``   open_clip's own blocks (nn.MultiheadAttention), same deep prompts, no bridge
* ``off``         patched, IWTD off (SDPA blocks)
* ``perturb``     the release: IWTD on layers 0-5, selected tokens x (1 + sigma eps), nothing removed
* ``drop``        IWTD on layers 0-5 at the release probabilities (p in [0.1, 0.5]), tokens removed
* ``drop_fixed``  keep 0.5 of the eligible tokens after layer 0 only (vision_layers=[0])
* ``patchdropout`` open_clip's PatchDropout(0.5) on the unpatched model (drops before layer 0)

Each image case runs in fp32; ``off``, ``drop`` and their ``unpatched`` baseline also under bf16
autocast (``-bf16`` ids; CPU too, through drople_fast.training.precision, the trainer's mapping).

plus the text tower (eval forward of 100 class prompts "a photo of a {class}.")
unpatched, patched with and without EOS trimming.

Every step also records (untimed bookkeeping, cheap): the mean number of real
tokens per sample entering each block (for the ideal token-ratio speedup), and
memory -- CUDA: ``torch.cuda.max_memory_allocated`` over the step; CPU: (a)
bytes of tensors autograd saved for backward during the step (activation
memory, counted once per storage) and (b) the process peak RSS over the step
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``; includes the
allocator's caches and the model, so it is only a coarse upper bound).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import drople_fast as df
from drople_fast.clip import patch
from drople_fast.training.precision import autocast

from classnames import CIFAR100
from machine import sync
from smoke import env_int, vit_b16

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = env_int("BENCH_BATCH", 32 if DEVICE.type == "cuda" else 8, smoke=2)
ROUNDS = env_int("BENCH_ROUNDS", 3, smoke=1)
WARMUP = env_int("BENCH_WARMUP", 1, smoke=0)
N_PROMPTS, PROMPT_DEPTH = 4, 6


class VisualPrompts(nn.Module):
    """4 learnable visual prompt tokens per layer for layers 0-5 (the release's deep visual prompts)."""

    def __init__(self, width: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(PROMPT_DEPTH, 1, N_PROMPTS, width) * 0.02)

    def vision_prompts(self, layer, batch):
        return self.tokens[layer] if layer < PROMPT_DEPTH else None

    def text_prompts(self, layer, batch):
        return None


@pytest.fixture(scope="module")
def clip():
    model = vit_b16(DEVICE)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(DEVICE)


# --------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------


def _rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Per-step memory and per-block token counts; the last step's values are kept."""

    def __init__(self):
        self.tokens: list[float] = []
        self.widths: list[int] = []
        self.mem: dict = {}

    def block(self, x: torch.Tensor, layout):
        # layout: the patch's attention.Layout (valid = (B, S) bool, None without padding) or None
        valid = getattr(layout, "valid", None)
        if valid is None:
            self.tokens.append(float(x.shape[1]))
        else:
            self.tokens.append(float(valid.sum(dim=-1).float().mean()))
        self.widths.append(int(x.shape[1]))

    def run(self, fn):
        self.tokens, self.widths = [], []
        saved: dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                saved[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
            return t

        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss_ok = _rss_reset()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        sync(DEVICE)
        self.mem = {"saved_bytes": sum(saved.values())}
        if DEVICE.type == "cuda":
            self.mem["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        if rss_ok:
            self.mem["rss_peak_bytes"] = _rss_peak()
        return out


METER = Meter()


@pytest.fixture
def meter(monkeypatch):
    original = patch.block_forward

    def counting(block, x, layout=None, kernel="sdpa", return_qk=False, **kwargs):
        METER.block(x, layout)
        return original(block, x, layout, kernel, return_qk, **kwargs)

    monkeypatch.setattr(patch, "block_forward", counting)
    return METER


def record(benchmark, name, kind, batch, full_tokens, layers, precision="fp32"):
    tokens = METER.tokens or [float(full_tokens)] * layers
    benchmark.extra_info.update(
        case=name, kind=kind, precision=precision, batch=batch, device=str(DEVICE), device_name=_device_name(), threads=torch.get_num_threads(),
        loadavg=os.getloadavg()[0], layers=layers, full_tokens=full_tokens, tokens_per_layer=tokens,
        width_per_layer=METER.widths or [int(t) for t in tokens], **METER.mem,
    )


def _device_name():
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def bench(benchmark, step):
    benchmark.pedantic(lambda: METER.run(step), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


# --------------------------------------------------------------------------
# the image-tower training step
# --------------------------------------------------------------------------


def unpatched_forward(visual, x, hook):
    """open_clip's own modules with the same deep prompts inserted after CLS (what the patch does)."""
    x = visual._embeds(x)  # conv, CLS, positions, PatchDropout (if set and training), ln_pre
    B = x.shape[0]
    n_prev = 0
    for i, block in enumerate(visual.transformer.resblocks):
        p = hook.vision_prompts(i, B)
        if p is not None:
            x = torch.cat([x[:, :1], p.expand(B, -1, -1).to(x.dtype), x[:, 1 + n_prev:]], dim=1)
            n_prev = p.shape[1]
        METER.block(x, None)
        x = block(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj


def image_step(model, images, hook, patched: bool, precision: str = "fp32"):
    def step():
        for p in hook.parameters():
            p.grad = None
        with autocast(precision, DEVICE):  # forward only, as in the trainer
            if patched:
                for p in model.drople_bridge.parameters():
                    p.grad = None
                out = model.encode_image(images)
                loss = out.float().square().mean()
                for f in df.bridge_features(model)["vision"].values():
                    loss = loss + f.float().square().mean()
            else:
                loss = unpatched_forward(model.visual, images, hook).float().square().mean()
        loss.backward()
        return loss

    return step


IMAGE_CASES = {
    "unpatched": None,
    "off": dict(mode="off"),
    "perturb": dict(mode="perturb", vision_layers=range(6)),
    "drop": dict(mode="drop", vision_layers=range(6)),
    "drop_fixed": dict(mode="drop_fixed", vision_layers=[0], keep_ratio=0.5),
    "patchdropout": "patchdropout",
}


BF16_IMAGE_CASES = ("unpatched", "off", "drop")  # unpatched: the bf16 rows' own speedup baseline
IMAGE_PARAMS = [pytest.param(c, "fp32", id=c) for c in IMAGE_CASES] + \
               [pytest.param(c, "bf16", id=f"{c}-bf16") for c in BF16_IMAGE_CASES]


@pytest.mark.parametrize("case,precision", IMAGE_PARAMS)
def test_image_train_step(benchmark, clip, images, meter, case, precision):
    import open_clip

    spec = IMAGE_CASES[case]
    benchmark.group = f"vit_b16_image_train_step_b{BATCH}_{precision}"
    hook = VisualPrompts(clip.visual.transformer.width).to(DEVICE)
    clip.train()
    full = 1 + N_PROMPTS + (224 // 16) ** 2
    L = len(clip.visual.transformer.resblocks)
    if isinstance(spec, dict):
        df.apply(clip, df.IWTDConfig(text_layers=(), **{"vision_layers": (), **spec}))
        df.set_prompt_hook(clip, hook)
        try:
            bench(benchmark, image_step(clip, images, hook, True, precision))
        finally:
            df.remove(clip)
    else:
        old = clip.visual.patch_dropout
        if spec == "patchdropout":
            clip.visual.patch_dropout = open_clip.transformer.PatchDropout(0.5)
        try:
            bench(benchmark, image_step(clip, images, hook, False, precision))
        finally:
            clip.visual.patch_dropout = old
    record(benchmark, case, "image", BATCH, full, L, precision)


# --------------------------------------------------------------------------
# the text tower: 100 class prompts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unpatched", "untrimmed", "eos_trim"])
def test_text_forward_100_classes(benchmark, clip, meter, case):
    import open_clip

    benchmark.group = "vit_b16_text_forward_100_classes"
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    text = tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CIFAR100]).to(DEVICE)
    clip.eval()
    full = text.shape[1]
    L = len(clip.transformer.resblocks)

    def step():
        with torch.no_grad():
            return clip.encode_text(text)

    if case == "unpatched":
        bench(benchmark, step)
    else:
        df.apply(clip, df.IWTDConfig(mode="off", eos_trim=case == "eos_trim"))
        try:
            bench(benchmark, step)
        finally:
            df.remove(clip)
    record(benchmark, case, "text", text.shape[0], full, L)
    benchmark.extra_info["longest_eos"] = int(text.argmax(dim=-1).max()) + 1
