"""``drople-fast demo``: base-to-novel prompt learning end to end, with no download, on 2 CPU cores.

What it does, honestly (docs/demo.md):

1. Pre-trains the toy CLIP of :data:`drople_fast.training.tiny_clip.TINY_224_CONFIG` (random init; 224-px
   input, patch 32, 12 layers of width 64) contrastively on "web" images of *all* classes with their
   class-name captions ("a photo of a red circle."). The web images are rendered in memory from their own
   random stream: no downstream image, train or test, is ever seen in pre-training, and the novel classes
   are known only from here, as web pre-training gives a real CLIP its open vocabulary. These are not
   pretrained weights; they give zero-shot CLIP real signal to start from.
2. Writes the downstream few-shot dataset (:mod:`drople_fast.training.data.synthetic`, domain
   "downstream"): the same classes shot differently (a colour cast, brighter ramped backgrounds, smaller
   objects, clutter), so zero-shot CLIP has room to improve, as it has on a real downstream dataset.
3. Trains on the base half of the classes with a few shots, with one seed and the same data, the same
   learner three ways: plain deep prompt learning (CE only: no IWTD, no regulariser), DroPLe ``perturb``
   (the release's recipe) and DroPLe ``drop`` (this project's), and prints Base / Novel / HM of each
   (last epoch, test split) beside zero-shot CLIP's, with the seconds per training epoch.

The paper's numbers need real pretrained CLIP weights and the datasets; see docs/training.md.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .losses import LossWeights
from .progress import progress_bar
from .report import to_markdown

CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a drawing of a {}.")
# The pre-training images come from their own stream, never the downstream dataset's (seed 0 there).
PRETRAIN_SEED_OFFSET = 1_000_003
# Plain deep prompt learning: the same learner and schedule, cross-entropy alone.
CE_ONLY = LossWeights(ce=1.0, text_l1=0.0, image_l1=0.0, kl=0.0, entropy=0.0, align=0.0)
# (row label, IWTD mode, loss weights): the demo's training runs, in table order.
METHODS: Tuple[Tuple[str, str, LossWeights], ...] = (
    ("Deep prompt learning (CE only)", "off", CE_ONLY),
    ("DroPLe (perturb, release)", "perturb", LossWeights()),
    ("DroPLe (drop, ours)", "drop", LossWeights()),
)
ZERO_SHOT = "Zero-shot CLIP (toy)"
DEFAULT_NUM_CLASSES, DEFAULT_IMAGES_PER_CLASS, DEFAULT_PRETRAIN_STEPS = 16, 60, 400
DEFAULT_SHOTS, DEFAULT_EPOCHS = 16, 5


def _pretrain_lr_lambda(total_steps: int, warmup_steps: int):
    """Per-step linear warm-up then cosine to 0: the toy CLIP's pre-training only (DroPLe training uses
    the release's schedule, :func:`drople_fast.training.schedule.build_scheduler`)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def web_images(classnames: Sequence[str], per_class: int, size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) uint8 pre-training images of ``classnames`` in the "web" domain, and their labels."""
    from .data.synthetic import WEB, render_image

    rng = np.random.default_rng(seed + PRETRAIN_SEED_OFFSET)
    images, labels = [], []
    for _ in range(per_class):
        for label, name in enumerate(classnames):
            images.append(torch.from_numpy(render_image(name, size, rng, WEB)).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def pretrain_tiny_clip(classnames: Sequence[str], out_path: str, steps: int = 400, per_class: int = 40,
                       batch_size: int = 32, lr: float = 2e-3, seed: int = 0, progress: bool = True,
                       config: Optional[Dict] = None) -> Dict:
    """Contrastively pre-train the demo's toy CLIP on web images of ``classnames``; save an open_clip checkpoint.

    Each step matches a batch of images against one caption per class present (random templates) with
    the symmetric CLIP loss over (image, its class caption) pairs. ``config``: the open_clip config
    (default :data:`~drople_fast.training.tiny_clip.TINY_224_CONFIG`). Returns a few statistics.
    """
    import open_clip

    from ..clip.config import IWTDConfig
    from ..clip.patch import apply, remove
    from .data.patch_augment import PatchRandAugment
    from .data.transforms import normalize_uint8
    from .tiny_clip import TINY_224_CONFIG, create_tiny_clip

    model = create_tiny_clip(seed=seed, base=config or TINY_224_CONFIG)
    size = int(model.visual.image_size[0])
    images, labels = web_images(classnames, per_class, size, seed)
    # Fast path for the towers (SDPA, EOS trimming), no IWTD; removed again before saving.
    apply(model, IWTDConfig(mode="off"))
    model.train()
    # The word embeddings stay at their random init: training all 49408 rows (3.2M of 4.6M weights, dense
    # AdamW updates) costs most of a step on a CPU, and the text transformer learns on top of them.
    model.token_embedding.weight.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("drople_bridge")]
    # Half of each batch gets the release's per-patch augmentation: a real CLIP's features survive such
    # local photometric changes (it has seen the web's variety); a toy pre-trained on clean renders does
    # not, and its teacher and student would start below chance on the student's images.
    augment = PatchRandAugment()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _pretrain_lr_lambda(steps, max(1, steps // 10)))
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    shift_max = size // 14  # a random translation of up to one 16-px patch, wrapping around
    t0 = time.perf_counter()
    loss_value = float("nan")
    for _ in progress_bar(range(steps), desc="pre-train toy CLIP", enabled=progress):
        idx = torch.randperm(len(images), generator=gen)[:batch_size]
        x, y = images[idx], labels[idx]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        shift = [int(v) for v in torch.randint(-shift_max, shift_max + 1, (2,), generator=gen)]
        x = torch.roll(x, shifts=shift, dims=(-2, -1))
        x = normalize_uint8(torch.stack([augment(im, gen) if k % 2 else im for k, im in enumerate(x)]))
        classes, target = torch.unique(y, return_inverse=True)
        captions = [rng.choice(CAPTION_TEMPLATES).format(classnames[int(c)]) for c in classes]
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.tokenize(captions)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        # image -> its class caption, and caption -> the mean over its images (multi-positive)
        loss_i = F.cross_entropy(logits, target)
        pos = F.one_hot(target, len(classes)).t().float()
        loss_t = -(F.log_softmax(logits.t(), dim=-1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        loss_value = float(loss.detach())
    remove(model)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    torch.save(model.state_dict(), out_path)
    return {"steps": steps, "final_loss": loss_value, "time_s": time.perf_counter() - t0}


def seconds_per_epoch(metrics: Dict) -> float:
    info = metrics["info"]
    return float(info["train_time_s"]) / max(1, int(info["epochs"]))


def table_rows(results: Sequence[Tuple[str, Dict]]) -> List[Dict]:
    """One row per method: zero-shot CLIP (from the first run; every run's teacher is the same frozen
    CLIP, which is checked) then each training run, with Base / Novel / HM and seconds per epoch."""
    first = results[0][1]
    zs = {k: first["zs_" + k] for k in ("base_acc", "novel_acc", "hm")}
    for label, m in results[1:]:
        other = {k: m["zs_" + k] for k in zs}
        if other != zs:
            raise RuntimeError(f"zero-shot accuracy differs between runs ({label}: {other} vs {zs}); "
                               "the runs do not share the frozen CLIP and test data")
    rows = [{"method": ZERO_SHOT, **zs, "s_per_epoch": None}]
    for label, m in results:
        rows.append({"method": label, **{k: m[k] for k in zs}, "s_per_epoch": seconds_per_epoch(m)})
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    """Markdown: Method / Base / Novel / HM / s per epoch."""
    return to_markdown(["Method", "Base", "Novel", "HM", "s per epoch"],
                       [[r["method"], (r["base_acc"], None), (r["novel_acc"], None), (r["hm"], None),
                         "" if r["s_per_epoch"] is None else f"{r['s_per_epoch']:.1f}"] for r in rows])


def prepare(out_dir: str, num_classes: int = DEFAULT_NUM_CLASSES, images_per_class: int = DEFAULT_IMAGES_PER_CLASS,
            pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
            progress: bool = True) -> Tuple[str, str]:
    """Write the downstream dataset and pre-train the toy CLIP into ``out_dir`` (each only once);
    return (dataset root, checkpoint path)."""
    from .data import write_synthetic_coop_dataset
    from .data.synthetic import class_names

    data_root = os.path.join(out_dir, "data")
    if not os.path.isfile(os.path.join(data_root, "synthetic", "split_zhou_Synthetic.json")):
        write_synthetic_coop_dataset(data_root, num_classes=num_classes, images_per_class=images_per_class,
                                     image_size=224, seed=0, domain="downstream")
    ckpt = os.path.join(out_dir, f"toy_clip_{pretrain_steps}steps.pt")
    if not os.path.isfile(ckpt):
        print(f"pre-training the toy CLIP for {pretrain_steps} steps (not real CLIP weights) ...", flush=True)
        stats = pretrain_tiny_clip(class_names(num_classes), ckpt, steps=pretrain_steps, seed=0,
                                   progress=progress)
        print(f"pre-trained in {stats['time_s']:.0f} s (final contrastive loss {stats['final_loss']:.3f})",
              flush=True)
    return data_root, ckpt


def train_method(data_root: str, ckpt: str, run_dir: str, mode: str, weights: LossWeights, seed: int = 1,
                 shots: int = DEFAULT_SHOTS, epochs: int = DEFAULT_EPOCHS, progress: bool = True,
                 **overrides) -> Dict:
    """One base-to-novel run of the demo's learner on the toy CLIP (release defaults otherwise)."""
    from ..clip.config import IWTDConfig
    from .tiny_clip import TINY_224_NAME
    from .trainer import TrainConfig, train

    cfg = TrainConfig(dataset="Synthetic", root=data_root, protocol="base2novel", shots=shots, seed=seed,
                      epochs=epochs, batch_size=4, model=TINY_224_NAME, pretrained=ckpt,
                      iwtd=IWTDConfig(mode=mode), loss_weights=weights, output_dir=run_dir,
                      progress=progress, resume=True, **overrides)
    return train(cfg)


def run_demo(out_dir: Optional[str] = None, num_classes: int = DEFAULT_NUM_CLASSES,
             images_per_class: int = DEFAULT_IMAGES_PER_CLASS, pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
             shots: int = DEFAULT_SHOTS, epochs: int = DEFAULT_EPOCHS, seed: int = 1,
             methods: Sequence[Tuple[str, str, LossWeights]] = METHODS, progress: bool = True,
             num_threads: Optional[int] = None, **overrides) -> Dict:
    """Run the demo into ``out_dir`` (a new temporary folder by default); return {"rows", "runs", "time_s"}.

    ``overrides``: further TrainConfig fields for every run (e.g. ``lr``)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    out_dir = out_dir or tempfile.mkdtemp(prefix="drople-demo-")
    os.makedirs(out_dir, exist_ok=True)
    t_setup = time.perf_counter()
    data_root, ckpt = prepare(out_dir, num_classes, images_per_class, pretrain_steps, progress)
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    results = []
    for label, mode, weights in methods:
        print(f"training: {label}", flush=True)
        run_dir = os.path.join(out_dir, f"seed{seed}-{mode}-{'ce' if weights == CE_ONLY else 'drople'}")
        results.append((label, train_method(data_root, ckpt, run_dir, mode, weights, seed=seed, shots=shots,
                                            epochs=epochs, progress=progress, **overrides)))
    rows = table_rows(results)
    elapsed = time.perf_counter() - t0
    print()
    print(format_table(rows))
    print(f"toy CLIP (224 px, patch 32, width 64), {num_classes // 2 + num_classes % 2} base + "
          f"{num_classes // 2} novel classes, {shots} shots, {epochs} epochs, seed {seed}; "
          f"training + evaluation {elapsed:.0f} s, set-up {setup_s:.0f} s, {torch.get_num_threads()} threads")
    print(f"runs in {os.path.abspath(out_dir)}")
    return {"rows": rows, "runs": dict(results), "time_s": elapsed, "setup_s": setup_s}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="folder for data, toy CLIP and runs (default: a new temp folder)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--shots", type=int, default=DEFAULT_SHOTS)
    p.add_argument("--pretrain-steps", type=int, default=DEFAULT_PRETRAIN_STEPS)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 avoids oversubscription on a shared CPU)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")


def run_from_args(args) -> int:
    run_demo(args.out, epochs=args.epochs, shots=args.shots, pretrain_steps=args.pretrain_steps,
             seed=args.seed, progress=not args.no_progress, num_threads=args.threads or None)
    return 0
