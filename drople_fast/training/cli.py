"""The ``drople-fast`` console script: train, eval, launch, report, demo, info.

Bad input (unknown dataset/protocol/model, contradictory options, missing
paths, unreadable, damaged or mismatched checkpoints and configs, too few
images for the shots asked, a locked run directory) and failing file systems
(read-only, full, file-size limit) end with a one-line ``drople-fast: error:
...`` on stderr and exit code 2, no traceback (set ``DROPLE_FAST_DEBUG=1`` to
see it), and never a run directory with a ``metrics.json`` in it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

EXIT_USAGE = 2


class CLIError(Exception):
    pass


def _add_train_options(p: argparse.ArgumentParser, single: bool = True) -> None:
    """Training options; every default is read from TrainConfig / IWTDConfig (one home for defaults)."""
    from ..clip.config import MODES, IWTDConfig
    from .data.transforms import AUGMENTATIONS
    from .trainer import default_of

    iwtd = IWTDConfig()
    if single:
        p.add_argument("--dataset", required=True, help="dataset name (e.g. DTD, ImageNet, Synthetic)")
        p.add_argument("--seed", type=int, default=default_of("seed"))
        p.add_argument("--output-dir", required=True, help="run directory")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir (or return it if finished with the same fingerprint)")
    p.add_argument("--root", required=True, help="dataset root in the CoOp layout")
    p.add_argument("--protocol", default=default_of("protocol"),
                   help="base2novel | cross_dataset | dg | few_shot | long_tail")
    p.add_argument("--shots", type=int, default=default_of("shots"))
    p.add_argument("--epochs", type=int, default=default_of("epochs"))
    p.add_argument("--batch-size", type=int, default=default_of("batch_size"))
    p.add_argument("--lr", type=float, default=default_of("lr"))
    p.add_argument("--lora-lr", type=float, default=default_of("lora_lr"))
    p.add_argument("--lora-rank", type=int, default=default_of("lora_rank"),
                   help="LoRA rank on q/v of vision layers 6-11 (0 = off)")
    p.add_argument("--weight-decay", type=float, default=default_of("weight_decay"))
    p.add_argument("--model", default=default_of("model"), help="'tiny' or an open_clip name such as ViT-B-16")
    p.add_argument("--pretrained", default=None,
                   help="local weights: open_clip .pt/.safetensors, OpenAI TorchScript .pt, or a HF CLIP folder")
    p.add_argument("--mode", default=iwtd.mode, choices=MODES, help="IWTD mode")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-ratio", type=float, default=None,
                      help="drop_fixed only: fraction of eligible tokens kept, in (0, 1] (default 0.5)")
    keep.add_argument("--keep-tokens", type=int, default=None, help="drop_fixed only: eligible tokens kept")
    p.add_argument("--p-min", type=float, default=iwtd.p_min)
    p.add_argument("--p-max", type=float, default=iwtd.p_max)
    p.add_argument("--sigma", type=float, default=iwtd.sigma,
                   help="perturb mode: std of the per-element multiplicative noise 1 + sigma * eps; 0 disables "
                        "the noise (the release's --noise_injection_sigma 0) while scores, drop probabilities and "
                        "bridge features are still computed")
    p.add_argument("--descriptions", default=None, help="optional JSON of class descriptions (never required)")
    p.add_argument("--targets", nargs="*", default=None, help="cross_dataset/dg test datasets")
    p.add_argument("--imbalance", type=float, default=None,
                   help=f"long_tail imbalance factor (default {default_of('imbalance')})")
    p.add_argument("--device", default=default_of("device"))
    p.add_argument("--num-workers", type=int, default=default_of("num_workers"))
    p.add_argument("--precision", default=default_of("precision"),
                   help="auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 (autocast, also on the CPU: "
                        "see drople-fast info) | fp16 (autocast with a loss scaler)")
    p.add_argument("--augment", default=default_of("augment"), choices=AUGMENTATIONS,
                   help="training augmentation: patch = the release's per-patch RandAugment, teacher on the clean "
                        "image; none; randaugment / crop_flip = RandomResizedCrop + flip (+ RandAugment), "
                        "teacher on the student's image")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="run the teacher's image forward every step instead of once per training image")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on --resume, the run's)")
    p.add_argument("--no-progress", action="store_true")


def _config(args, dataset: str, seed: int, output_dir: str, resume: bool):
    from ..clip.config import IWTDConfig
    from .trainer import TrainConfig

    iwtd = IWTDConfig(mode=args.mode, p_min=args.p_min, p_max=args.p_max, sigma=args.sigma,
                      keep_ratio=args.keep_ratio, keep_tokens=args.keep_tokens)
    optional = {k: v for k, v in (("imbalance", args.imbalance),) if v is not None}
    return TrainConfig(dataset=dataset, root=args.root, protocol=args.protocol, shots=args.shots, seed=seed,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr,
                       weight_decay=args.weight_decay, model=args.model, pretrained=args.pretrained, iwtd=iwtd,
                       lora_rank=args.lora_rank, descriptions=args.descriptions, targets=args.targets,
                       output_dir=output_dir, device=args.device,
                       num_workers=args.num_workers, precision=args.precision, augment=args.augment,
                       teacher_cache=not args.no_teacher_cache,
                       resume=resume, progress=not args.no_progress,
                       num_threads=args.threads, **optional)


def _check_inputs(args) -> None:
    """Cheap checks with clear messages before anything heavy is imported or built."""
    from .data import canonical_name
    from .protocols import canonical_protocol

    canonical_protocol(args.protocol)
    for name in list(getattr(args, "datasets", None) or [getattr(args, "dataset", None)]) + list(args.targets or []):
        if name is not None:
            canonical_name(name)
    if not os.path.isdir(args.root):
        raise FileNotFoundError(f"dataset root not found: {args.root}")
    if args.pretrained is not None and not os.path.exists(args.pretrained):
        raise FileNotFoundError(f"pretrained weights not found: {args.pretrained}")
    if args.descriptions is not None and not os.path.isfile(args.descriptions):
        raise FileNotFoundError(f"class description file not found: {args.descriptions}")


def cmd_train(args) -> int:
    from .trainer import train

    config = _config(args, args.dataset, args.seed, args.output_dir, args.resume)  # option checks first
    _check_inputs(args)
    metrics = train(config)
    if metrics:  # empty on DDP ranks other than 0
        _print_summary(metrics)
    return 0


def _print_summary(metrics: dict) -> None:
    keys = [k for k in metrics if isinstance(metrics[k], float) and not k.startswith("zs_") and k != "images_per_s"]
    print(f"{metrics['dataset']} seed {metrics['seed']} ({metrics['protocol']}): "
          + ", ".join(f"{k} {metrics[k]:.2f}" for k in keys))


def cmd_eval(args) -> int:
    from .trainer import evaluate

    if not os.path.isdir(args.run):
        raise FileNotFoundError(f"run directory not found: {args.run}")
    metrics = evaluate(args.run, checkpoint=args.checkpoint, dataset=args.dataset, root=args.root,
                       protocol=args.protocol, device=args.device, progress=not args.no_progress)
    print(metrics["table"], end="")
    return 0


def run_dir_for(output_dir: str, protocol: str, dataset: str, seed: int, shots: int) -> str:
    from .protocols import canonical_protocol

    protocol = canonical_protocol(protocol)
    leaf = f"shots{shots}_seed{seed}" if protocol == "few_shot" else f"seed{seed}"
    return os.path.join(output_dir, protocol, dataset, leaf)


def cmd_launch(args) -> int:
    """Every train dataset x seed, like the release's launch script; finished runs are skipped,
    interrupted ones resumed. Test datasets (``--targets``) go to cross_dataset / dg."""
    from .data import canonical_name
    from .trainer import train

    _check_inputs(args)
    results = []
    for dataset in args.datasets:
        name = canonical_name(dataset)
        for seed in args.seeds:
            run_dir = run_dir_for(args.output_dir, args.protocol, name, seed, args.shots)
            print(f"== {name} seed {seed} -> {run_dir}", flush=True)
            metrics = train(_config(args, name, seed, run_dir, resume=True))
            _print_summary(metrics)
            results.append(metrics)
    if args.report:
        from .report import write_report

        for path in write_report(args.output_dir, os.path.join(args.output_dir, "report")):
            print(path)
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    paths = write_report(args.runs, args.out or os.path.join(args.runs, "report"))
    for path in paths:
        print(path)
    md = [p for p in paths if p.endswith(".md")]
    for path in md:
        with open(path, encoding="utf-8") as f:
            print(f.read())
    return 0


def cmd_demo(args) -> int:
    from .demo import run_from_args

    return run_from_args(args)


def cmd_info(args) -> int:
    from ..info import main as info_main

    return int(info_main() or 0)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="drople-fast", description="Fast DroPLe prompt learning for open_clip CLIP.")
    parser.add_argument("--version", action="version", version=f"drople-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one dataset/seed into a run directory")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint (optionally on another dataset/protocol)")
    p.add_argument("run", help="run directory (holds config.json and checkpoint.pt)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--root", default=None)
    p.add_argument("--protocol", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("launch", help="train many datasets x seeds (skips finished runs, resumes interrupted ones)")
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--output-dir", required=True, help="runs go to <output-dir>/<protocol>/<dataset>/seed<s>")
    p.add_argument("--report", action="store_true", help="write <output-dir>/report when done")
    _add_train_options(p, single=False)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("report", help="aggregate run directories into Markdown/CSV tables and a PNG plot")
    p.add_argument("runs", help="folder searched recursively for metrics.json")
    p.add_argument("out", nargs="?", default=None, help="output folder (default <runs>/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="base-to-novel on built-in synthetic data with a toy CLIP (no download)")
    from .demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="versions and usable backends")
    p.set_defaults(func=cmd_info)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, CLIError) as exc:
        # OSError: missing files, a read-only or full file system, a file-size limit, ...
        if os.environ.get("DROPLE_FAST_DEBUG") == "1":
            raise
        print(f"drople-fast: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("drople-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
