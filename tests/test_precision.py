"""--precision / TrainConfig.precision: autocast per precision (CPU too), fp16 loss scaling, fingerprint,
resume checks, one-line CLI errors, and the CPU bf16-hardware advice of ``drople-fast info``."""
import json

import pytest
import torch

from drople_fast.info import cpu_bf16_advice
from drople_fast.training import run_dir as rd
from drople_fast.training.cli import _config, build_parser, main
from drople_fast.training.data import write_synthetic_coop_dataset
from drople_fast.training.precision import autocast, cpu_bf16_hardware, cpu_flags, resolve_precision
from drople_fast.training.trainer import (CHECKPOINT, TrainConfig, build_clip, build_training, default_of,
                                          _check_resume, _execution, load_checkpoint, make_plan, seed_everything, train,
                                          train_one_epoch)
from run_config import tiny_run_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_coop_dataset(str(root), num_classes=4, images_per_class=4, image_size=32, seed=0)
    return str(root)


def config(root, out, **kw):
    return tiny_run_config(root, out, **{"augment": "none", **kw})


def test_auto_resolves_to_fp32_on_cpu_and_bf16_on_cuda():
    assert default_of("precision") == "auto"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16"
    with autocast("auto", CPU):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast("fp16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16


@pytest.mark.parametrize("precision,dtype", [("auto", None), ("fp32", None), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_training_step_per_precision_on_cpu(data_root, tmp_path, precision, dtype):
    cfg = config(data_root, tmp_path / "run", precision=precision)
    plan = make_plan(cfg)
    seed_everything(cfg.seed)
    setup = build_training(cfg, plan, build_clip(cfg.model, None), CPU)
    seen = []
    setup.learner.register_forward_pre_hook(
        lambda m, a: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    before = {n: p.detach().clone() for n, p in setup.learner.trainable_named_parameters()}
    sums, batches, images = train_one_epoch(setup.learner, setup.loader, setup.optimizer, setup.scheduler, CPU,
                                            cfg.precision, 0, 1)
    assert batches >= 1 and seen == [dtype] * batches
    assert all(torch.isfinite(torch.tensor(v)) for v in sums.values()), sums
    moved = [n for n, p in setup.learner.trainable_named_parameters() if not torch.equal(p, before[n])]
    assert moved, "no parameter was updated"


def test_fp16_run_saves_its_loss_scaler(data_root, tmp_path):
    out = tmp_path / "run"
    train(config(data_root, out, precision="fp16"))
    ckpt = load_checkpoint(str(out / CHECKPOINT))
    assert ckpt["scaler"]["scale"] > 0  # the GradScaler's state, restored on resume
    assert ckpt["execution"]["precision"] == "fp16"
    train(config(data_root, tmp_path / "fp32", precision="fp32"))
    assert load_checkpoint(str(tmp_path / "fp32" / CHECKPOINT))["scaler"] == {}  # disabled scaler: no state


def test_fingerprint_holds_the_precision():
    fps = {p: rd.fingerprint(TrainConfig(precision=p).to_dict(), None, "") for p in ("auto", "fp32", "bf16")}
    assert fps["fp32"] != fps["bf16"] != fps["auto"]
    assert rd.fingerprint_diff(fps["fp32"], fps["bf16"]) == ["precision: 'fp32' -> 'bf16'"]


def test_resume_with_another_precision_is_refused(data_root, tmp_path):
    out = tmp_path / "run"
    train(config(data_root, out, precision="fp32"))
    (out / rd.METRICS).unlink()  # as if killed after its last checkpoint
    with pytest.raises(rd.RunDirError, match="precision: 'fp32' -> 'bf16'"):
        train(config(data_root, out, precision="bf16", resume=True))


def test_resume_of_auto_on_another_device_type_is_refused(data_root, tmp_path):
    # "auto" is one fingerprint on every device; what it resolved to is checked with the execution facts
    cfg = config(data_root, tmp_path / "run")
    fp = rd.fingerprint(cfg.to_dict(), None, "")
    ckpt = {"fingerprint": fp, "epoch": 1, "execution": {**_execution(cfg, CPU), "precision": "bf16"}}
    with pytest.raises(rd.RunDirError, match="precision=bf16 .* now fp32 on cpu"):
        _check_resume(ckpt, cfg, fp, "ckpt.pt", CPU)
    ckpt["execution"]["precision"] = "fp32"
    _check_resume(ckpt, cfg, fp, "ckpt.pt", CPU)


def test_bad_precision_is_a_one_line_cli_error(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(out), "--epochs", "1",
               "--threads", "1", "--no-progress", "--precision", "fp8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("drople-fast: error:") and "precision" in err, err
    assert "fp8" in err and "bf16" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.from_dict({"precision": True})  # a hand-edited config.json


def test_cli_precision_default_comes_from_trainconfig(tmp_path):
    base = ["train", "--dataset", "Synthetic", "--root", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    args = build_parser().parse_args(base)
    assert _config(args, args.dataset, args.seed, args.output_dir, False).precision == default_of("precision")
    args = build_parser().parse_args(base + ["--precision", "bf16"])
    assert _config(args, args.dataset, args.seed, args.output_dir, False).precision == "bf16"


def test_cpu_bf16_detection_from_flag_strings():
    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile avx512_bf16\n"
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n"
    old = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    assert cpu_bf16_hardware(cpu_flags(amx)) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_hardware(cpu_flags(zen4)) == ("avx512_bf16",)
    assert cpu_bf16_hardware(cpu_flags(old)) == ()
    assert cpu_flags("no flags line at all") == ()
    yes = cpu_bf16_advice(amx, capability="AVX512")
    assert yes.startswith("yes (amx_bf16, avx512_bf16; torch CPU capability AVX512)") and "--precision bf16" in yes
    no = cpu_bf16_advice(old, capability="AVX2")
    assert no.startswith("no (") and "AVX2" in no and "--precision auto" in no


def test_run_from_an_earlier_version_is_a_one_line_error_naming_the_replacement(tmp_path, capsys):
    """config.json files written before precision / augment / the release's warm-up name their fields."""
    run = tmp_path / "old_run"
    run.mkdir()
    old = {**TrainConfig().to_dict(), "bf16": True, "randaugment": True, "warmup_epochs": 1.0}
    (run / "config.json").write_text(json.dumps(old))
    rc = main(["eval", str(run), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "'bf16' is gone (now precision" in err and "'randaugment' is gone (now augment" in err, err
    assert "'warmup_epochs' is gone" in err and "start a new run" in err, err


def test_device_label_names_the_cpu_model():
    from drople_fast.training.precision import device_label

    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512_bf16\n"
    assert device_label(torch.device("cpu"), cpuinfo).startswith("AMD EPYC 9B14 (")
    assert device_label("cpu", "").endswith(" cores)")  # no model name: the machine type
    zen5 = "processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    assert device_label("cpu", zen5).startswith("AMD EPYC, family 26 model 2 (")


def test_cpu_bf16_summary_names_the_extensions():
    from drople_fast.training.precision import cpu_bf16_summary

    assert cpu_bf16_summary(["fpu", "avx512_bf16"]) == "avx512_bf16"
    assert cpu_bf16_summary(["fpu", "avx2"]) == "no bf16 extensions"
