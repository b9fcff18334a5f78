"""The ``drople-fast`` console script: train, eval, launch, export, report, demo, info.

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
    from .precision import PRECISIONS
    from .protocols import PROTOCOLS
    from .trainer import default_of

    iwtd = IWTDConfig()
    if single:
        p.add_argument("--dataset", default=None,
                       help="a known dataset's name (e.g. DTD, ImageNet, Synthetic), or the name of your own "
                            "(with --dataset-dir; default: from its split file, split_zhou_<Name>.json)")
        p.add_argument("--seed", type=int, default=default_of("seed"), help="run seed")
        p.add_argument("--output-dir", required=True, help="run directory")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir (or return it if finished with the same fingerprint)")
        own = p.add_argument_group("a dataset of your own (docs/own-data.md)")
        own.add_argument("--dataset-dir", default=None,
                         help="folder in the CoOp layout: split_zhou_<Name>.json ({train,val,test: [[relpath, "
                              "label, classname], ...]}) and the images (in images/ or beside the split file)")
        own.add_argument("--split-file", default=None,
                         help="the split file (with --dataset-dir, relative to it: needed when that folder holds "
                              "several; alone, its folder is the dataset folder)")
        own.add_argument("--image-dir", default=None,
                         help="folder inside --dataset-dir the split's paths are relative to (default: images/ "
                              "if the split's first image is there, else --dataset-dir)")
        own.add_argument("--template", default=None,
                         help="the teacher's first template, {} = class name (default for your own data: "
                              "'a photo of a {}.'; for a known dataset: its CoOp template)")
    p.add_argument("--root", default=None,
                   help="dataset root holding the known datasets in the CoOp layout (required unless --dataset-dir)")
    p.add_argument("--allow-fewer", action="store_true",
                   help="a class with fewer training images than --shots keeps all it has instead of failing")
    p.add_argument("--protocol", default=default_of("protocol"), metavar="{" + ",".join(PROTOCOLS) + "}",
                   help="evaluation protocol")
    p.add_argument("--shots", type=int, default=default_of("shots"),
                   help="training images per class (<= 0: the full training split)")
    p.add_argument("--epochs", type=int, default=default_of("epochs"), help="training epochs")
    p.add_argument("--batch-size", type=int, default=default_of("batch_size"), help="training batch size (per rank)")
    p.add_argument("--lr", type=float, default=default_of("lr"), help="learning rate of prompts, bridge, logit scale")
    p.add_argument("--lora-lr", type=float, default=default_of("lora_lr"), help="learning rate of LoRA")
    p.add_argument("--lora-rank", type=int, default=default_of("lora_rank"),
                   help="LoRA rank on q/v of vision layers 6-11 (0 = off)")
    p.add_argument("--weight-decay", type=float, default=default_of("weight_decay"), help="AdamW weight decay")
    p.add_argument("--model", default=default_of("model"), help="'tiny' or an open_clip name such as ViT-B-16")
    p.add_argument("--pretrained", default=None,
                   help="local weights file or folder: open_clip .pt/.safetensors, OpenAI TorchScript .pt, or a "
                        "HF CLIP folder (nothing downloads; without it a non-tiny model trains from random weights)")
    p.add_argument("--mode", default=iwtd.mode, choices=MODES, help="IWTD mode")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-ratio", type=float, default=None,
                      help="drop_fixed only: fraction of eligible tokens kept, in (0, 1] (None: 0.5)")
    keep.add_argument("--keep-tokens", type=int, default=None, help="drop_fixed only: eligible tokens kept")
    p.add_argument("--p-min", type=float, default=iwtd.p_min, help="smallest drop probability")
    p.add_argument("--p-max", type=float, default=iwtd.p_max, help="largest drop probability")
    p.add_argument("--sigma", type=float, default=iwtd.sigma,
                   help="perturb mode: std of the per-element multiplicative noise 1 + sigma * eps; 0 disables "
                        "the noise (the release's --noise_injection_sigma 0) while scores, drop probabilities and "
                        "bridge features are still computed")
    p.add_argument("--descriptions", default=None, help="optional JSON of class descriptions (never required)")
    p.add_argument("--targets", nargs="*", default=None, help="cross_dataset/dg test datasets (None: the paper's)")
    p.add_argument("--imbalance", type=float, default=None,
                   help=f"long_tail imbalance factor (None: {default_of('imbalance')})")
    p.add_argument("--device", default=default_of("device"), help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-workers", type=int, default=default_of("num_workers"), help="data loader workers")
    p.add_argument("--precision", default=default_of("precision"), metavar="{" + ",".join(PRECISIONS) + "}",
                   help="auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 (autocast, also on the CPU: "
                        "see drople-fast info) | fp16 (autocast with a loss scaler)")
    p.add_argument("--augment", default=default_of("augment"), choices=AUGMENTATIONS,
                   help="training augmentation: patch = the release's per-patch RandAugment, teacher on the clean "
                        "image; none; randaugment / crop_flip = RandomResizedCrop + flip (+ RandAugment), "
                        "teacher on the student's image")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="run the teacher's image forward every step instead of once per training image")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (None: torch's choice; on --resume, the run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the start-up summary still prints)")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="no TensorBoard events (the per-step CSV log <output-dir>/train_log.csv is always written)")


def _config(args, dataset: str, seed: int, output_dir: str, resume: bool):
    from ..clip.config import IWTDConfig
    from .trainer import TrainConfig, default_of

    iwtd = IWTDConfig(mode=args.mode, p_min=args.p_min, p_max=args.p_max, sigma=args.sigma,
                      keep_ratio=args.keep_ratio, keep_tokens=args.keep_tokens)
    optional = {k: v for k, v in (("imbalance", args.imbalance),) if v is not None}
    own = {k: getattr(args, k, None) for k in ("dataset_dir", "split_file", "image_dir", "template")}
    return TrainConfig(dataset=dataset, root=args.root if args.root is not None else default_of("root"),
                       protocol=args.protocol, shots=args.shots, seed=seed,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lora_lr=args.lora_lr,
                       weight_decay=args.weight_decay, model=args.model, pretrained=args.pretrained, iwtd=iwtd,
                       lora_rank=args.lora_rank, descriptions=args.descriptions, targets=args.targets,
                       output_dir=output_dir, device=args.device,
                       num_workers=args.num_workers, precision=args.precision, augment=args.augment,
                       teacher_cache=not args.no_teacher_cache,
                       resume=resume, progress=not args.no_progress,
                       num_threads=args.threads, allow_fewer=args.allow_fewer,
                       tensorboard=not args.no_tensorboard, **own, **optional)


def _own_dataset(args) -> bool:
    return getattr(args, "dataset_dir", None) is not None or getattr(args, "split_file", None) is not None


def _dataset_name(args) -> str:
    """``--dataset``, or for your own dataset the name its split file gives."""
    if args.dataset is not None:
        return args.dataset
    if not _own_dataset(args):
        raise CLIError("pass --dataset NAME (a known dataset under --root), or --dataset-dir DIR / --split-file "
                       "FILE for a dataset of your own")
    from .data.catalog import find_split_file, split_file_name

    return split_file_name(args.split_file if args.split_file is not None else find_split_file(args.dataset_dir))


def _check_inputs(args) -> None:
    """Cheap checks with clear messages before anything heavy is imported or built."""
    from .data import canonical_name
    from .protocols import canonical_protocol

    canonical_protocol(args.protocol)
    own = _own_dataset(args)
    names = [] if own else list(getattr(args, "datasets", None) or [getattr(args, "dataset", None)])
    for name in names + list(args.targets or []):
        if name is not None:
            canonical_name(name)
    if own:
        folder = args.dataset_dir if args.dataset_dir is not None else os.path.dirname(os.path.abspath(args.split_file))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"dataset folder not found: {folder}")
        if args.split_file is not None:
            path = args.split_file if args.dataset_dir is None else os.path.join(args.dataset_dir, args.split_file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"split file not found: {path}")
    if args.root is None and (not own or args.targets):
        raise CLIError("--root (the folder of the known datasets) is required" + ("" if own else
                       "; for a dataset of your own pass --dataset-dir DIR"))
    if args.root is not None and not os.path.isdir(args.root):
        raise FileNotFoundError(f"dataset root not found: {args.root}")
    if args.pretrained is not None and not os.path.exists(args.pretrained):
        from .pretrained import missing_weights_message

        raise FileNotFoundError(missing_weights_message(args.pretrained))
    if args.descriptions is not None and not os.path.isfile(args.descriptions):
        raise FileNotFoundError(f"class description file not found: {args.descriptions}")


def cmd_train(args) -> int:
    from .trainer import train

    config = _config(args, _dataset_name(args), args.seed, args.output_dir, args.resume)  # option checks first
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


def cmd_export(args) -> int:
    from .export import export_run

    if not os.path.exists(args.run):
        raise FileNotFoundError(f"run directory not found: {args.run}")
    size = export_run(args.run, args.out)
    print(f"{args.out}: {size / 1e6:.2f} MB (prompts, LoRA, bridge, config; no CLIP weights). Load it with "
          f"drople_fast.training.load_prompts({args.out!r}, clip_weights=...)")
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

    def add(name: str, **kw) -> argparse.ArgumentParser:  # every subcommand's --help shows the defaults
        return sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    p = add("train", help="train one dataset/seed into a run directory")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = add("eval", help="evaluate a run's checkpoint (optionally on another dataset/protocol)")
    p.add_argument("run", help="run directory (holds config.json and checkpoint.pt)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (None: the run's checkpoint.pt)")
    p.add_argument("--dataset", default=None, help="evaluate on this known dataset (None: the run's)")
    p.add_argument("--root", default=None, help="dataset root (None: the run's)")
    p.add_argument("--protocol", default=None, help="protocol (None: the run's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = add("launch", help="train many datasets x seeds (skips finished runs, resumes interrupted ones)")
    p.add_argument("--datasets", nargs="+", required=True, help="known dataset names")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="run seeds")
    p.add_argument("--output-dir", required=True, help="runs go to <output-dir>/<protocol>/<dataset>/seed<s>")
    p.add_argument("--report", action="store_true", help="write <output-dir>/report when done")
    _add_train_options(p, single=False)
    p.set_defaults(func=cmd_launch)

    p = add("export", help="write a run's prompts, LoRA and bridge (no CLIP weights) to one safetensors "
                                      "file, for drople_fast.training.load_prompts")
    p.add_argument("run", help="run directory (or its checkpoint.pt)")
    p.add_argument("--out", required=True, help="output file, e.g. prompts.safetensors")
    p.set_defaults(func=cmd_export)

    p = add("report", help="aggregate run directories into Markdown/CSV tables and a PNG plot")
    p.add_argument("runs", help="folder searched recursively for metrics.json")
    p.add_argument("out", nargs="?", default=None, help="output folder (None: <runs>/report)")
    p.set_defaults(func=cmd_report)

    p = add("demo", help="base-to-novel on built-in synthetic data with a toy CLIP (no download)")
    from .demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = add("info", help="versions and usable backends")
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
