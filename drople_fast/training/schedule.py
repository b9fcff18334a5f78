"""The release's learning-rate schedule (release/train_drople.py:40-47, 239-254)."""
from __future__ import annotations

import math

import torch

# The release's learning-rate floors (release/train_drople.py:243): 1e-5 for the prompts' group,
# max(lora_lr / lr * 1e-5, 5e-6) for LoRA's.
MIN_LR, LORA_MIN_LR = 1e-5, 5e-6


def release_lr_lambda(min_lr: float, base_lr: float, num_warmup_steps: int, num_training_steps: int,
                      num_cycles: float = 0.5):
    """The release's ``get_cosine_schedule_lambda_with_warmup`` (release/train_drople.py:40-47): linear
    warm-up, then a half cosine, both floored at ``min_lr / base_lr`` (a group with lr 0 stays at 0)."""
    floor = min_lr / base_lr if base_lr > 0 else 0.0

    def f(step: int) -> float:
        if step < num_warmup_steps:
            return max(floor, float(step) / float(max(1, num_warmup_steps)))
        progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        return max(floor, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The release's LambdaLR over ``optimizer``'s groups [prompts, LoRA?] (release/train_drople.py:239-254):
    one warm-up step, ``max(epochs, 20) + 1`` steps in all, each group floored at its own min lr.
    :func:`drople_fast.training.epoch.train_one_epoch` steps it as the release does: once a tenth into epoch 0, once after every epoch."""
    groups = optimizer.param_groups
    lr = groups[0]["lr"]
    min_lrs = [MIN_LR] + [max(g["lr"] / lr * MIN_LR, LORA_MIN_LR) for g in groups[1:]]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        release_lr_lambda(m, g["lr"], 1, max(epochs, 20) + 1) for m, g in zip(min_lrs, groups)])
