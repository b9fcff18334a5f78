"""Training and evaluation: ``drople_fast.train(TrainConfig(...))``.

The run directory (files, lock, fingerprint, checksums, clean-up) is owned by
:mod:`drople_fast.training.run_dir`. ``resume=True`` continues from its
checkpoint with every state restored (learner, patch step counters,
optimizer, scheduler, every RNG state), so the final weights are bitwise
those of an uninterrupted run; a finished run with the same fingerprint is
returned as it is. The model of the last epoch is evaluated; no test split
is ever used for selection. A non-finite loss or weight stops the run with
an error naming the epoch and step; such a run is never marked finished.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) training uses
DistributedDataParallel (gloo on CPU, nccl on CUDA) with a
DistributedSampler; rank 0 writes the run directory and evaluates.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, Optional, Tuple

import torch

from ..clip.patch import load_patch_state_dict, patch_state_dict
from . import run_dir as rd
from .build import (TrainingSetup, build_clip, build_teacher_cache, build_training, data_root,  # noqa: F401
                    fewshot_cache_dir, image_size_of, make_learner, make_plan, resolve_device, uses_teacher_cache)
from .config import TRAIN_DEFAULTS, TrainConfig, check_device_name, default_of  # noqa: F401
from .epoch import NonFiniteError, check_finite_weights, train_one_epoch  # noqa: F401
from .evaluation import evaluate_plan, evaluate_split, final_metrics, results_table  # noqa: F401
from .fileio import atomic_json, atomic_text, read_json_object
from .precision import device_label, grad_scaler, resolve_precision
from .progress import progress_bar
from .rng import rng_state, seed_everything, set_rng_state
from .run_log import open_run_loggers
from .schedule import build_scheduler, release_lr_lambda  # noqa: F401

# The run's rooms: config.py (TrainConfig), build.py (model, plan, learner, loader, optimiser), schedule.py,
# epoch.py (one epoch), evaluation.py, rng.py, run_dir.py. This module orchestrates them; the names
# imported above marked F401 stay importable from here, as before the split.
CHECKPOINT = rd.CHECKPOINT
load_checkpoint = rd.load_checkpoint


def _dist_info() -> Tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _execution(cfg: TrainConfig, device: torch.device) -> Dict:
    """What results depend on besides the fingerprint: recorded in checkpoints, checked on resume."""
    return {"num_threads": torch.get_num_threads(), "num_workers": cfg.num_workers,
            "precision": resolve_precision(cfg.precision, device)}  # what precision "auto" was on this device


def _check_resume(ckpt: Dict, cfg: TrainConfig, fp: Dict, path: str, device: torch.device) -> None:
    diff = rd.fingerprint_diff(ckpt["fingerprint"], fp)
    if diff:
        raise rd.RunDirError(f"cannot resume from {path}: configuration differs ({'; '.join(diff[:6])})")
    if ckpt["epoch"] > cfg.epochs:
        raise rd.RunDirError(f"cannot resume from {path}: its epoch {ckpt['epoch']} exceeds epochs={cfg.epochs}")
    saved = ckpt["execution"]
    if cfg.num_threads is None and torch.get_num_threads() != saved["num_threads"]:
        torch.set_num_threads(saved["num_threads"])  # CPU reductions depend on the thread count
    now = _execution(cfg, device)
    for name, flag in (("num_threads", "--threads"), ("num_workers", "--num-workers")):
        if now[name] != saved[name]:
            raise rd.RunDirError(f"cannot resume from {path} bit-exactly: it ran with {name}={saved[name]}, now "
                                 f"{now[name]} (results depend on it); pass {flag} {saved[name]}")
    # The fingerprint holds the precision asked for; "auto" resolves per device type (checkpoints written
    # before precision existed lack it).
    if "precision" in saved and now["precision"] != saved["precision"]:
        raise rd.RunDirError(f"cannot resume from {path}: it ran with precision={saved['precision']} "
                             f"(precision {cfg.precision!r} on its device), now {now['precision']} on {device.type}; "
                             "resume it on the device type it ran on")


class _StepReport:
    """The per-step callback of one epoch: advances the progress bar (loss, img/s over the epoch so far) and
    writes the step's row to the run's logs (:mod:`.run_log`)."""

    def __init__(self, epoch: int, steps: int, bar, logger, t0: float):
        self.epoch, self.steps, self.bar, self.logger = epoch, steps, bar, logger
        self.t_epoch = self.t_last = t0
        self.images = 0

    def __call__(self, step: int, terms: Dict[str, float], lrs, images: int) -> None:
        now = time.perf_counter()
        self.images += images
        step_rate = images / (now - self.t_last) if now > self.t_last else 0.0
        self.t_last = now
        if self.logger is not None:
            row = {"epoch": self.epoch + 1, "step": step + 1, "global_step": self.epoch * self.steps + step + 1,
                   "lr": lrs[0], **({"lr_lora": lrs[1]} if len(lrs) > 1 else {}),
                   "loss": terms.get("total", 0.0),
                   **{f"loss_{k}": v for k, v in terms.items() if k != "total"}, "images_per_s": step_rate}
            self.logger.log_step(row)
        if not self.bar.disable:
            rate = self.images / (now - self.t_epoch) if now > self.t_epoch else 0.0
            self.bar.set_postfix_str(f"epoch {self.epoch + 1} loss {terms.get('total', 0.0):.4f} img/s {rate:.1f}",
                                     refresh=False)
            self.bar.update(1)


def parameter_counts(learner) -> Dict[str, int]:
    """Trainable parameters by part: prompts (text and vision context), LoRA, the IWTD bridge, logit scale."""
    counts = {"prompts": 0, "LoRA": 0, "bridge": 0, "logit scale": 0}
    for name, p in learner.trainable_named_parameters():
        part = ("LoRA" if name.startswith("lora.") else "bridge" if name.startswith("clip.")
                else "logit scale" if name == "logit_scale" else "prompts")
        counts[part] += p.numel()
    return counts


def startup_summary(cfg: TrainConfig, plan, learner, device: torch.device, steps: int, log_notes) -> str:
    """What the run is about to do, in three lines: data, model and trainable parameters, logs."""
    evals = ", ".join(f"{e.name} {len(e.classnames)} classes / {len(e.records)} images" for e in plan.evals)
    shots = f"{cfg.shots} shots" if cfg.shots > 0 else "all images"
    counts = parameter_counts(learner)
    parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)
    weights = cfg.pretrained if cfg.pretrained is not None else "random weights"
    return "\n".join([
        f"drople-fast: {plan.dataset} ({plan.protocol}, {shots}, seed {cfg.seed}): {len(plan.train_classnames)} "
        f"training classes, {len(plan.train_records)} training images; evaluation: {evals}",
        f"drople-fast: model {cfg.model} ({weights}), mode {cfg.iwtd.mode}, {resolve_precision(cfg.precision, device)} "
        f"on {device}; trainable parameters {sum(counts.values()):,} ({parts}); {steps} steps/epoch x "
        f"{cfg.epochs} epochs",
        "drople-fast: " + "; ".join(log_notes)])


def train(config: TrainConfig | Dict) -> Dict:
    """Train DroPLe as ``config`` says and return the final metrics (also in ``metrics.json``)."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    world, rank, local_rank = _dist_info()
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if (cfg.device != "cpu" and torch.cuda.is_available()) else "gloo"
            dist.init_process_group(backend)
        if cfg.device == "auto" and torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = resolve_device(cfg.device)
    else:
        device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg, device, world, rank, distributed)
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device, world: int, rank: int, distributed: bool) -> Dict:
    main = rank == 0
    # Everything that can fail on bad input happens before the run directory is touched.
    plan = make_plan(cfg)
    fp = rd.fingerprint(cfg.to_dict(), plan, data_root(cfg))
    run = rd.RunDir(cfg.output_dir).open() if main else None
    failed, logger = True, None
    try:
        resume_ckpt = None
        if main:
            run.check_fingerprint(fp)
            holds_run = any(run.has(n) for n in (rd.CHECKPOINT, rd.METRICS, rd.CONFIG))
            if holds_run and not cfg.resume:
                raise rd.RunDirError(f"run directory {cfg.output_dir} already holds a run; pass resume=True "
                                     "(--resume) to continue or reuse it, or pick another")
            if run.has(rd.METRICS) and not distributed:
                from .report import read_metrics

                metrics = read_metrics(run.file(rd.METRICS))  # finished, same fingerprint: nothing to do
                metrics.pop("_path", None)
                failed = False
                return metrics
            if run.has(rd.CHECKPOINT):
                resume_ckpt = rd.load_checkpoint(run.checkpoint_path)
                _check_resume(resume_ckpt, cfg, fp, run.checkpoint_path, device)
        elif cfg.resume:
            path = os.path.join(cfg.output_dir, CHECKPOINT)
            resume_ckpt = rd.load_checkpoint(path) if os.path.isfile(path) else None
        clip = build_clip(cfg.model, cfg.pretrained, device)
        seed_everything(cfg.seed)
        setup = build_training(cfg, plan, clip, device, world, rank)
        learner, loader, sampler, gen = setup.learner, setup.loader, setup.sampler, setup.generator
        optimizer, scheduler, image_size = setup.optimizer, setup.scheduler, setup.image_size
        if uses_teacher_cache(cfg):
            setup.teacher_cache = build_teacher_cache(cfg, plan, setup, device, world, rank)
        scaler = grad_scaler(cfg.precision, device)

        start_epoch, history = 0, []
        if resume_ckpt is not None:
            learner.load_prompt_state_dict(resume_ckpt["learner"], CHECKPOINT)
            load_patch_state_dict(clip, resume_ckpt["patch"])
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            scheduler.load_state_dict(resume_ckpt["scheduler"])
            scaler.load_state_dict(resume_ckpt.get("scaler", {}))  # {} = no fp16 scaler (a no-op load)
            set_rng_state(resume_ckpt["rng"], gen)
            start_epoch, history = int(resume_ckpt["epoch"]), list(resume_ckpt["history"])

        model = learner
        if distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                learner, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

        out = cfg.output_dir
        steps = len(loader)
        if main:
            run.start(cfg.to_dict(), fp)
            logger, log_notes = open_run_loggers(out, start_epoch, steps, cfg.tensorboard)
            print(startup_summary(cfg, plan, learner, device, steps, log_notes), flush=True)
        train_time = sum(h["time_s"] for h in history)
        images_seen = sum(h["images"] for h in history)
        bar = progress_bar(total=cfg.epochs * steps, initial=start_epoch * steps, desc=f"train {plan.dataset}",
                           unit="step", enabled=cfg.progress and main, dynamic_ncols=True)
        for epoch in range(start_epoch, cfg.epochs):
            if distributed:
                sampler.set_epoch(epoch)
            learner.train()
            lr_now = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            on_step = _StepReport(epoch, steps, bar, logger if main else None, t0)
            sums, n_batches, n_images = train_one_epoch(model, loader, optimizer, scheduler, device, cfg.precision,
                                                        epoch, cfg.epochs, world, setup.teacher_cache, scaler,
                                                        on_step=on_step)
            check_finite_weights(learner, epoch)
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            images_seen += n_images
            record = {"epoch": epoch + 1, "loss": sums.get("total", 0.0) / max(1, n_batches),
                      **{f"loss_{k}": v / max(1, n_batches) for k, v in sums.items() if k != "total"},
                      "lr": lr_now, "time_s": elapsed, "images": n_images,
                      "images_per_s": n_images / elapsed if elapsed > 0 else 0.0}
            history.append(record)
            if main:
                run.save_checkpoint({"format": rd.CHECKPOINT_FORMAT, "epoch": epoch + 1, "config": cfg.to_dict(),
                                     "fingerprint": fp, "execution": _execution(cfg, device),
                                     "classnames": list(plan.train_classnames),
                                     "learner": learner.prompt_state_dict(), "patch": patch_state_dict(clip),
                                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "scaler": scaler.state_dict(), "rng": rng_state(gen), "history": history})
                run.write_history(history)
        bar.close()
        if distributed:
            torch.distributed.barrier()
        if not main:
            failed = False
            return {}
        accs, zs = evaluate_plan(learner, plan, cfg, device, image_size)
        info = {"epochs": cfg.epochs, "shots": cfg.shots, "mode": cfg.iwtd.mode, "model": cfg.model,
                "precision": resolve_precision(cfg.precision, device), "device": device_label(device),
                "pretrained": cfg.pretrained, "world_size": world, "train_time_s": train_time,
                "images_per_s": images_seen / train_time if train_time > 0 else 0.0,
                "final_loss": history[-1]["loss"] if history else None, "run_dir": os.path.abspath(out)}
        metrics = final_metrics(cfg, plan, accs, zs, info)
        run.write_results(results_table(plan, {**accs, "_mode": cfg.iwtd.mode}, zs))
        run.write_metrics(metrics)
        failed = False
        return metrics
    finally:
        if main:
            if logger is not None:
                if failed and not run.has(rd.CHECKPOINT):
                    logger.discard()  # nothing of a run that never checkpointed stays
                else:
                    logger.close()
            run.close(failed)


# --------------------------------------------------------------------------
# evaluate a finished (or checkpointed) run
# --------------------------------------------------------------------------


def evaluate(run_dir: str, checkpoint: Optional[str] = None, dataset: Optional[str] = None,
             root: Optional[str] = None, protocol: Optional[str] = None, device: str = "auto",
             progress: bool = True, write: bool = True) -> Dict:
    """Evaluate the learner saved in ``run_dir`` (or ``checkpoint``); optionally on another
    dataset/protocol. Writes ``eval/<dataset>_<protocol>.json`` and ``.md`` in the run dir."""
    config_path = os.path.join(run_dir, rd.CONFIG)
    try:
        cfg = TrainConfig.from_dict(read_json_object(config_path, "run config"))
    except ValueError as exc:
        raise ValueError(f"run config {config_path} is not valid: {exc}") from None
    ckpt_path = checkpoint or os.path.join(run_dir, CHECKPOINT)
    ckpt = load_checkpoint(ckpt_path)
    diff = rd.fingerprint_diff(ckpt["fingerprint"]["config"], rd.fingerprint(cfg.to_dict(), None, "")["config"]) \
        if isinstance(ckpt["fingerprint"], dict) and "config" in ckpt["fingerprint"] else ["fingerprint: malformed"]
    if diff:
        raise rd.RunDirError(f"{config_path} does not describe {ckpt_path} ({'; '.join(diff[:6])})")
    overrides = {k: v for k, v in (("dataset", dataset), ("root", root), ("protocol", protocol)) if v is not None}
    if dataset is not None and dataset != cfg.dataset:
        # another dataset than the run's own one: a known dataset under root
        overrides.update(dataset_dir=None, split_file=None, image_dir=None)
    ecfg = dataclasses.replace(cfg, device=device, progress=progress, **overrides)
    plan = make_plan(ecfg)
    dev = resolve_device(device)
    clip = build_clip(cfg.model, cfg.pretrained, dev)
    seed_everything(cfg.seed)
    learner = make_learner(cfg, clip, plan.train_classnames).to(dev)
    learner.load_prompt_state_dict(ckpt["learner"], ckpt_path)
    try:
        load_patch_state_dict(clip, ckpt["patch"])
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"{ckpt_path} does not match the model: {exc}".splitlines()[0]) from exc
    accs, zs = evaluate_plan(learner, plan, ecfg, dev, image_size_of(clip))
    metrics = final_metrics(ecfg, plan, accs, zs, {"checkpoint": os.path.abspath(ckpt_path),
                                                   "epoch": ckpt["epoch"], "mode": cfg.iwtd.mode})
    metrics["table"] = results_table(plan, {**accs, "_mode": cfg.iwtd.mode}, zs)
    if write:
        folder = os.path.join(run_dir, "eval")
        os.makedirs(folder, exist_ok=True)
        stem = f"{plan.dataset}_{plan.protocol}"
        atomic_text(os.path.join(folder, stem + ".md"), metrics["table"])
        # not named metrics.json, so report never mixes re-evaluations with training runs
        atomic_json(os.path.join(folder, stem + ".json"), metrics)
    return metrics
