"""Evaluation of a learner: accuracy of the prompted model and of zero-shot CLIP on a plan's splits,
the results table and the ``metrics.json`` record."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from .precision import autocast
from .progress import progress_bar
from .protocols import Plan, metrics_from_accuracies
from .report import to_markdown


@torch.no_grad()
def evaluate_split(learner, records, classnames, device, image_size: int, batch_size: int = 64,
                   num_workers: int = 0, precision: str = "auto", progress: bool = True, desc: str = "eval"):
    """(prompted accuracy %, zero-shot accuracy %) of ``learner`` on ``records``."""
    from .data import ImageDataset, eval_transform

    was_training = learner.training
    learner.eval()
    previous = list(learner.classnames)
    try:
        learner.set_classnames(classnames)
        loader = torch.utils.data.DataLoader(ImageDataset(records, eval_transform(image_size)),
                                             batch_size=batch_size, shuffle=False, num_workers=num_workers)
        correct = zs_correct = total = 0
        with autocast(precision, device):
            txt = learner.text_features()
            txt_zs = learner.teacher_text_features()
            for images, labels in progress_bar(loader, desc=desc, leave=False, enabled=progress):
                images, labels = images.to(device), labels.to(device)
                img = learner.image_features(images)
                correct += int((learner.logits(img, txt).argmax(-1) == labels).sum())
                img_zs = learner.teacher_image_features(images)
                zs_correct += int(((img_zs @ txt_zs.t()).argmax(-1) == labels).sum())
                total += labels.numel()
    finally:
        if previous:
            learner.set_classnames(previous)
        learner.train(was_training)
    if total == 0:
        raise ValueError(f"{desc}: nothing to evaluate")
    return 100.0 * correct / total, 100.0 * zs_correct / total


def evaluate_plan(learner, plan: Plan, cfg, device, image_size: int) -> Tuple[Dict, Dict]:
    accs, zs = {}, {}
    for split in plan.evals:
        accs[split.name], zs[split.name] = evaluate_split(
            learner, split.records, split.classnames, device, image_size, cfg.eval_batch_size, cfg.num_workers,
            cfg.precision, cfg.progress, desc=f"eval {split.dataset}")
    return metrics_from_accuracies(plan, accs), metrics_from_accuracies(plan, zs)


def results_table(plan: Plan, metrics: Dict, zero_shot: Dict) -> str:
    """Markdown table of zero-shot CLIP vs DroPLe on the plan's metrics."""
    keys = [s.name for s in plan.evals] + (["hm"] if plan.protocol == "base2novel" else [])
    label = {"base_acc": "Base", "novel_acc": "Novel", "hm": "HM", "acc": plan.dataset}
    head = ["Method"] + [label.get(k, k.replace("acc_", "")) for k in keys]
    methods = (("Zero-shot CLIP", zero_shot), (f"DroPLe ({metrics.get('_mode', '')})".replace(" ()", ""), metrics))
    return to_markdown(head, [[name] + [(m[k], None) for k in keys] for name, m in methods])


def final_metrics(cfg, plan: Plan, accs: Dict, zs: Dict, info: Dict) -> Dict:
    """``metrics.json`` in the schema of :mod:`drople_fast.training.report`."""
    out: Dict[str, Any] = {"dataset": plan.dataset, "seed": cfg.seed, "protocol": plan.protocol,
                           "method": f"drople-{cfg.iwtd.mode}"}
    if plan.protocol == "few_shot":
        out["shots"] = cfg.shots
    out.update({k: float(v) for k, v in accs.items()})
    out.update({f"zs_{k}": float(v) for k, v in zs.items()})
    if "images_per_s" in info:
        out["images_per_s"] = float(info["images_per_s"])
    out["info"] = info
    return out
