"""One training epoch, as the release runs it, and the divergence checks around it."""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from .precision import autocast, grad_scaler


class NonFiniteError(ValueError):
    """Training diverged (a NaN or infinite loss or weight)."""


def train_one_epoch(model, loader, optimizer, scheduler, device, precision: str, epoch: int, epochs: int,
                    world: int = 1, teacher_cache=None, scaler=None,
                    on_step: Optional[Callable[[int, Dict[str, float], Tuple[float, ...], int], None]] = None,
                    ) -> Tuple[Dict[str, float], int, int]:
    """One pass over ``loader``: (summed loss terms, batches, images over all ranks).

    As the release's ``train`` (release/train_drople.py:363-384): the scheduler steps once before batch
    ``len(loader) // 10`` of epoch 0 (ending its one-step warm-up) and once after the epoch; the learner
    gets the integer ``epoch`` for the residual-entropy λ (``current_epoch=epoch``, :375).

    Batches are ``(student images, teacher images, labels, dataset indices)``
    (:class:`~drople_fast.training.data.TrainImageDataset`). The frozen teacher gets its image
    features from ``teacher_cache`` (by dataset index) when given, else runs on the teacher images.

    ``scaler``: the fp16 loss scaler (:func:`drople_fast.training.precision.grad_scaler`); None makes one
    for ``precision`` (disabled, a no-op, unless fp16).

    Raises :class:`NonFiniteError` naming the epoch and step on a NaN/inf loss (checked on the value
    already copied to the host for the running sums: no extra synchronisation).

    ``on_step(step, terms, lrs, images)`` is called after every optimiser step with the 0-based step,
    the loss terms as host floats (the values the sums add), every parameter group's learning rate
    for that step and the step's images over all ranks (the progress bar and the per-step logs).
    """
    sums: Dict[str, float] = {}
    n_batches = n_images = 0
    steps = len(loader)
    if scaler is None:
        scaler = grad_scaler(precision, device)
    for step, (images, teacher_images, labels, index) in enumerate(loader):
        if epoch == 0 and step == steps // 10:
            with warnings.catch_warnings():
                # With < 10 batches this precedes the first optimizer step, as in the release; torch's warning
                # that the schedule's first value is skipped is then exactly the release's behaviour.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
        images, labels = images.to(device), labels.to(device)
        if teacher_cache is not None:
            teacher = {"teacher_features": teacher_cache[index]}
        else:
            teacher = {"teacher_images": teacher_images.to(device)}
        with autocast(precision, device):
            _, terms = model(images, labels, epoch, epochs, **teacher)
        lrs = tuple(float(group["lr"]) for group in optimizer.param_groups)  # this step's rates
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["total"]).backward()
        scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        scaler.update()
        values: Dict[str, float] = {}
        for k, v in terms.items():
            value = float(v.detach())
            if not math.isfinite(value):
                raise NonFiniteError(f"training diverged: loss term {k!r} is {value} at epoch {epoch + 1} step "
                                     f"{step + 1} of {steps}; the run is stopped (lower --lr?)")
            sums[k] = sums.get(k, 0.0) + value
            values[k] = value
        n_batches += 1
        n_images += labels.numel() * world
        if on_step is not None:
            on_step(step, values, lrs, labels.numel() * world)
    scheduler.step()
    return sums, n_batches, n_images


def check_finite_weights(learner, epoch: int) -> None:
    params = [p for _, p in learner.trainable_named_parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        bad = [n for n, p in learner.trainable_named_parameters() if not bool(torch.isfinite(p).all())]
        raise NonFiniteError(f"training diverged: non-finite weights after epoch {epoch + 1} ({', '.join(bad[:3])})")
