"""``drople-fast demo``: base-to-novel DroPLe end to end, with no download, on 2 CPU cores.

What it does, honestly:

1. Writes the synthetic CoOp-format dataset of :mod:`drople_fast.training.data.synthetic`
   (classes such as "red circle", "blue stripes") into the run folder.
2. Pre-trains the *tiny* CLIP of :mod:`drople_fast.training.tiny_clip` (random init, 12
   layers of width 64) for a short while with a CLIP-style image-caption
   contrastive loss on the synthetic training images of all classes and their
   class-name captions ("a photo of a red circle."). This is a toy CLIP, not
   pretrained weights: it only gives the zero-shot model real signal to
   start from, the way web pre-training does for a real CLIP. No test image
   is used.
3. Runs DroPLe base-to-novel on it: prompt learning on the base half of the
   classes with a few shots, evaluated (last epoch) on the base and the
   novel classes' test images, and prints Base / Novel / HM for zero-shot
   CLIP and DroPLe.

The paper's numbers need real pretrained CLIP weights and the datasets; see
README.md for those commands.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..clip.config import MODES
from .report import to_markdown

CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a drawing of a {}.")


def _pretrain_lr_lambda(total_steps: int, warmup_steps: int):
    """Per-step linear warm-up then cosine to 0: the toy CLIP's pre-training only (DroPLe training uses
    the release's schedule, :func:`drople_fast.training.trainer.build_scheduler`)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def pretrain_tiny_clip(dataset_dir_root: str, out_path: str, steps: int = 200, batch_size: int = 32,
                       lr: float = 2e-3, seed: int = 0, progress: bool = True) -> Dict:
    """Contrastively pre-train the tiny CLIP on the synthetic *train* images; save an open_clip checkpoint.

    Each step matches a batch of images against one caption per class (random templates) with the
    symmetric CLIP loss over (image, its class caption) pairs. Returns a few statistics.
    """
    import open_clip
    from tqdm.auto import tqdm

    from ..clip.config import IWTDConfig
    from .data import ImageDataset, eval_transform, get_dataset
    from .tiny_clip import create_tiny_clip
    from ..clip.patch import apply, remove

    ds = get_dataset("Synthetic", dataset_dir_root)
    model = create_tiny_clip(seed=seed)
    size = int(model.visual.image_size[0])
    data = ImageDataset(ds.train, eval_transform(size))
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([r.label for r in ds.train])
    names = ds.classnames
    # Fast path for the towers (SDPA, EOS trimming), no IWTD; removed again before saving.
    apply(model, IWTDConfig(mode="off"))
    model.train()
    params = [p for n, p in model.named_parameters() if not n.startswith("drople_bridge")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _pretrain_lr_lambda(steps, max(1, steps // 10)))
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc="pre-train tiny CLIP", disable=not progress):
        idx = torch.randperm(len(images), generator=gen)[:batch_size]
        x, y = images[idx], labels[idx]
        # light augmentation: random flips and shifts
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        shift = [int(v) for v in torch.randint(-3, 4, (2,), generator=gen)]
        x = torch.roll(x, shifts=shift, dims=(-2, -1))
        classes, target = torch.unique(y, return_inverse=True)
        captions = [rng.choice(CAPTION_TEMPLATES).format(names[int(c)]) for c in classes]
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


def format_table(metrics: Dict) -> str:
    """Markdown table of zero-shot toy CLIP vs DroPLe, base / novel / HM."""
    keys = ("base_acc", "novel_acc", "hm")
    rows = [[name] + [(metrics[prefix + k], None) for k in keys]
            for name, prefix in (("Zero-shot CLIP (toy)", "zs_"), (f"DroPLe ({metrics['info']['mode']})", ""))]
    return to_markdown(["Method", "Base", "Novel", "HM"], rows)


def run_demo(out_dir: Optional[str] = None, mode: str = "drop", num_classes: int = 16, images_per_class: int = 40,
             pretrain_steps: int = 200, shots: int = 8, epochs: int = 5, seed: int = 1,
             lora_rank: Optional[int] = None,
             progress: bool = True, num_threads: Optional[int] = 1) -> Dict:
    """Run the demo into ``out_dir`` (a new temporary folder by default) and return the metrics.

    ``lora_rank`` None: TrainConfig's default, LoRA on as the release launches it (the demo shows the recipe;
    on the toy CLIP it costs about 10 % more training time)."""
    from ..clip.config import IWTDConfig
    from .data import write_synthetic_coop_dataset
    from .trainer import TrainConfig, train

    if num_threads:
        torch.set_num_threads(num_threads)
    out_dir = out_dir or tempfile.mkdtemp(prefix="drople-demo-")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    data_root = os.path.join(out_dir, "data")
    if not os.path.isfile(os.path.join(data_root, "synthetic", "split_zhou_Synthetic.json")):
        write_synthetic_coop_dataset(data_root, num_classes=num_classes, images_per_class=images_per_class,
                                     seed=0)
    ckpt = os.path.join(out_dir, "tiny_clip_pretrained.pt")
    if not os.path.isfile(ckpt):
        print(f"pre-training the toy CLIP for {pretrain_steps} steps (not real CLIP weights) ...")
        pretrain_tiny_clip(data_root, ckpt, steps=pretrain_steps, seed=0, progress=progress)
    run_dir = os.path.join(out_dir, f"run-{mode}")
    cfg = TrainConfig(dataset="Synthetic", root=data_root, protocol="base2novel", shots=shots, seed=seed,
                      epochs=epochs, batch_size=4, model="tiny", pretrained=ckpt,
                      iwtd=IWTDConfig(mode=mode), output_dir=run_dir,
                      progress=progress, resume=True,
                      **({} if lora_rank is None else {"lora_rank": lora_rank}))
    metrics = train(cfg)
    print()
    print(format_table(metrics))
    print()
    print(f"run directory: {os.path.abspath(run_dir)}  ({time.perf_counter() - t0:.0f} s)")
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="folder for data, toy CLIP and run (default: a new temp folder)")
    p.add_argument("--mode", default="drop", choices=MODES)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 avoids oversubscription on small CPUs; 0 = torch default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")


def run_from_args(args) -> int:
    run_demo(args.out, mode=args.mode, epochs=args.epochs, shots=args.shots, pretrain_steps=args.pretrain_steps,
             seed=args.seed, progress=not args.no_progress,
             num_threads=args.threads or None)
    return 0
