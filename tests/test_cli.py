"""The drople-fast CLI: launch + report, eval, bad input (exit 2, one line, no complete run), DDP via torchrun."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from drople_fast.training.cli import main
from drople_fast.training.data import write_synthetic_coop_dataset

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--epochs", "1", "--batch-size", "2", "--shots", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_synthetic_coop_dataset(root, num_classes=4, images_per_class=8, seed=0)
    # a second dataset in the registry's layout (OxfordPets: oxford_pets/images + split_zhou_OxfordPets.json)
    write_synthetic_coop_dataset(root, name="oxford_pets", num_classes=6, images_per_class=8, seed=1)
    return root


def complete_runs(folder):
    return [d for d, _, files in os.walk(folder) if "metrics.json" in files]


def test_launch_and_report(data_root, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["launch", "--datasets", "Synthetic", "OxfordPets", "--seeds", "1", "2", "--root", data_root,
               "--output-dir", str(out), *FAST])
    assert rc == 0
    assert len(complete_runs(out)) == 4
    assert (out / "base2novel" / "OxfordPets" / "seed2" / "metrics.json").exists()
    # a second launch skips finished runs
    assert main(["launch", "--datasets", "Synthetic", "--seeds", "1", "--root", data_root,
                 "--output-dir", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["report", str(out), str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "base2novel.md").read_text()
    assert "| Synthetic |" in md and "| OxfordPets |" in md and "| Average |" in md
    assert (tmp_path / "report" / "base2novel.csv").exists()
    assert (tmp_path / "report" / "accuracy_vs_throughput.png").stat().st_size > 0


def test_eval_writes_table(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(run), *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| Zero-shot CLIP |" in printed and "HM" in printed
    table = (run / "eval" / "Synthetic_base2novel.md").read_text()
    saved = json.loads((run / "metrics.json").read_text())
    assert f"{saved['base_acc']:.2f}" in table  # same weights, same numbers
    # evaluate the same prompts on another dataset with all its classes
    assert main(["eval", str(run), "--dataset", "OxfordPets", "--protocol", "few_shot", "--no-progress"]) == 0
    assert (run / "eval" / "OxfordPets_few_shot.md").exists()


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("drople-fast: error:"), err
    assert "Traceback" not in err
    return err


def test_bad_inputs_exit_2_without_complete_run(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--output-dir", str(out), *FAST]
    assert "Nope" in _error(capsys, ["train", "--dataset", "Nope", "--root", data_root, *common])
    assert "missing-root" in _error(capsys, ["train", "--dataset", "DTD", "--root", str(tmp_path / "missing-root"),
                                             *common])
    assert "dtd" in _error(capsys, ["train", "--dataset", "DTD", "--root", data_root, *common])  # not there
    assert "warp" in _error(capsys, ["train", "--dataset", "Synthetic", "--protocol", "warp", "--root", data_root,
                                     *common])
    too_many = ["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(out), "--epochs", "1",
                "--shots", "50", "--threads", "1", "--no-progress"]
    assert "50 shots" in _error(capsys, too_many)
    assert "nowhere.pt" in _error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root, "--pretrained",
                                           str(tmp_path / "nowhere.pt"), *common])
    assert not out.exists()  # nothing was created for any of them

    # truncated pretrained weights and a truncated run checkpoint
    good = tmp_path / "good"
    assert main(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(good), *FAST]) == 0
    capsys.readouterr()
    blob = (good / "checkpoint.pt").read_bytes()
    bad_weights = tmp_path / "weights.pt"
    bad_weights.write_bytes(blob[: len(blob) // 3])
    assert "weights.pt" in _error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root, "--pretrained",
                                           str(bad_weights), *common])
    assert not out.exists()
    (good / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    assert "checkpoint.pt" in _error(capsys, ["eval", str(good), "--no-progress"])
    (good / "metrics.json").unlink()
    assert "checkpoint.pt" in _error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root,
                                              "--output-dir", str(good), "--resume", *FAST])
    assert not (good / "metrics.json").exists()
    # a checkpoint of another architecture (LoRA rank 2) for a learner with the default rank 8
    other = tmp_path / "other"
    assert main(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(other),
                 "--lora-rank", "2", *FAST]) == 0
    capsys.readouterr()
    cfg = json.loads((good / "config.json").read_text())
    os.replace(other / "checkpoint.pt", good / "checkpoint.pt")
    assert "does not match" in _error(capsys, ["eval", str(good), "--checkpoint", str(good / "checkpoint.pt"),
                                               "--no-progress"])
    assert cfg["lora_rank"] == 8


def test_subprocess_error_is_one_line(data_root, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT_DIR)
    res = subprocess.run([sys.executable, "-m", "drople_fast", "train", "--dataset", "Imagenett", "--root", data_root,
                          "--output-dir", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    lines = [s for s in res.stderr.splitlines() if s.startswith("drople-fast")]
    assert lines and "Imagenett" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo(data_root, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT_DIR)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "drople_fast", "train",
           "--dataset", "Synthetic", "--root", data_root, "--shots", "4", "--epochs", "2", "--batch-size", "2",
           "--device", "cpu", "--output-dir", str(out), "--no-progress", "--threads", "1"]
    res = subprocess.run(cmd, cwd=ROOT_DIR, env=env, capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["info"]["world_size"] == 2
    history = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    # 2 base classes x 4 shots = 8 images = 2 ranks x batch 2 x 2 steps per epoch
    assert [h["images"] for h in history] == [8, 8]


def test_sigma_option_reaches_the_config(tmp_path, capsys):
    # --sigma is how a command-line user turns perturb mode's noise off (the release's --noise_injection_sigma 0)
    from drople_fast.clip.config import IWTDConfig
    from drople_fast.training.cli import _config, build_parser

    base = ["train", "--dataset", "Synthetic", "--root", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    args = build_parser().parse_args(base)
    assert _config(args, args.dataset, args.seed, args.output_dir, False).iwtd.sigma == IWTDConfig().sigma
    args = build_parser().parse_args(base + ["--mode", "perturb", "--sigma", "0"])
    cfg = _config(args, args.dataset, args.seed, args.output_dir, False)
    assert (cfg.iwtd.mode, cfg.iwtd.sigma) == ("perturb", 0.0)
    assert "sigma" in _error(capsys, base + ["--mode", "perturb", "--sigma", "-0.1"])
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------
# a dataset of your own, --allow-fewer, --help, messages

from own_data import write_own_dataset  # noqa: E402


def test_train_on_own_dataset_dir(tmp_path, capsys):
    folder = tmp_path / "coop_custom"
    write_own_dataset(str(folder))
    run = tmp_path / "run"
    # no --root, no --dataset: the name comes from split_zhou_MyFruits.json
    assert main(["train", "--dataset-dir", str(folder), "--output-dir", str(run), "--template", "a photo of {}, a fruit.",
                 *FAST]) == 0
    out = capsys.readouterr().out
    assert "MyFruits (base2novel, 2 shots, seed 1): 2 training classes, 4 training images" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "MyFruits" and "hm" in metrics
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["dataset"], cfg["dataset_dir"], cfg["template"]) == ("MyFruits", str(folder), "a photo of {}, a fruit.")
    assert (folder / "split_fewshot" / "MyFruits-base" / "train_shots2_seed1.json").exists()  # beside the data
    # the teacher's templates: yours first, never a known dataset's (even under a known name)
    from drople_fast.training.build import teacher_templates
    from drople_fast.training.config import TrainConfig

    assert teacher_templates(TrainConfig.from_dict(cfg))[0] == "a photo of {}, a fruit."
    as_dtd = TrainConfig(dataset="DTD", dataset_dir=str(folder))
    assert teacher_templates(as_dtd)[0] == "a photo of a {}." and teacher_templates(TrainConfig(dataset="DTD")) is None
    # --split-file alone: its folder is the dataset folder; the few-shot protocol uses every class
    run2 = tmp_path / "run2"
    assert main(["train", "--split-file", str(folder / "split_zhou_MyFruits.json"), "--protocol", "few_shot",
                 "--output-dir", str(run2), *FAST]) == 0
    assert json.loads((run2 / "metrics.json").read_text())["dataset"] == "MyFruits"
    # evaluating the run again reads the same folder
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 0
    assert f"{metrics['hm']:.2f}" in capsys.readouterr().out


def test_own_dataset_errors_are_one_line(tmp_path, capsys):
    folder = tmp_path / "fruits"
    split = write_own_dataset(str(folder), per_split=(2, 1, 1))
    out = tmp_path / "out"
    base = ["train", "--dataset-dir", str(folder), "--output-dir", str(out), *FAST]
    assert "pass --dataset NAME" in _error(capsys, ["train", "--output-dir", str(out), *FAST])
    assert "nowhere" in _error(capsys, ["train", "--dataset-dir", str(tmp_path / "nowhere"), "--output-dir", str(out),
                                        *FAST])
    assert "split_zhou_Other.json" in _error(capsys, base + ["--split-file", "split_zhou_Other.json"])
    assert "'{}'" in _error(capsys, base + ["--template", "a photo of a fruit."])
    # three shots asked, two images per class: the message names the class and the way out
    err = _error(capsys, base[:-len(FAST)] + ["--epochs", "1", "--shots", "3", "--threads", "1", "--no-progress"])
    assert "class 0 ('apple') has 2 images, fewer than the 3 shots" in err and "--allow-fewer" in err
    assert not out.exists()
    assert main(base[:-len(FAST)] + ["--epochs", "1", "--batch-size", "2", "--shots", "3", "--threads", "1",
                                     "--no-progress", "--allow-fewer"]) == 0
    assert json.loads((out / "config.json").read_text())["allow_fewer"] is True
    capsys.readouterr()
    # a broken image among the training ones: named, with its class, before anything trains
    (folder / "images" / split["train"][0][0]).write_bytes(b"not a png")
    err = _error(capsys, ["train", "--dataset-dir", str(folder), "--output-dir", str(tmp_path / "o2"), *FAST])
    assert "apple/train_0.png (class 'apple') is not a readable image" in err
    assert not (tmp_path / "o2").exists()


def test_known_dataset_shots_error_points_to_allow_fewer(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    err = _error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(out),
                          "--epochs", "1", "--shots", "50", "--threads", "1", "--no-progress"])
    assert "50 shots" in err and "--allow-fewer" in err
    assert main(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(out), "--epochs", "1",
                 "--batch-size", "4", "--shots", "50", "--threads", "1", "--no-progress", "--allow-fewer"]) == 0


def test_help_shows_defaults_and_choices(capsys):
    from drople_fast.training.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = TrainConfig()
    for flag, value in (("--shots", defaults.shots), ("--epochs", defaults.epochs), ("--lr", defaults.lr),
                        ("--protocol", defaults.protocol), ("--mode", defaults.iwtd.mode)):
        assert f"{flag}" in text and f"(default: {value})" in text, flag
    for choices in ("{base2novel,cross_dataset,dg,few_shot,long_tail}", "{off,perturb,drop,drop_fixed}",
                    "{auto,fp32,bf16,fp16}", "{patch,none,randaugment,crop_flip}"):
        assert choices in text, choices
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: auto)" in capsys.readouterr().out


def test_pretrained_tag_says_local_files_only(data_root, tmp_path, capsys):
    err = _error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(tmp_path / "r"),
                          "--pretrained", "openai", *FAST])
    assert "pretrained weights not found: openai" in err and "local file or folder only" in err


def test_model_messages(tmp_path, capsys, caplog):
    import logging

    from drople_fast.training.build import build_clip
    from drople_fast.training.tiny_clip import TINY_CONFIG, register_config

    caplog.set_level(logging.WARNING)
    build_clip("tiny")
    assert "No pretrained weights loaded" not in caplog.text  # random on purpose: open_clip's warning misleads
    assert "RANDOM" not in capsys.readouterr().err
    register_config("drople-test-named", TINY_CONFIG)  # any open_clip name other than "tiny"
    clip = build_clip("drople-test-named")
    err = capsys.readouterr().err.strip()
    assert err.startswith("drople-fast: WARNING: --model drople-test-named without --pretrained trains from RANDOM")
    assert len(err.splitlines()) == 1 and "No pretrained weights loaded" not in caplog.text
    # with local weights: no warning of either kind
    import torch

    weights = tmp_path / "w.pt"
    torch.save(clip.state_dict(), weights)
    build_clip("drople-test-named", str(weights))
    assert capsys.readouterr().err == "" and "No pretrained weights loaded" not in caplog.text
    # other open_clip messages are not swallowed
    logging.getLogger().warning("something else")
    assert "something else" in caplog.text


def test_info_rebuild_hint(monkeypatch, capsys):
    import importlib

    from drople_fast import info
    from drople_fast.ops import library

    monkeypatch.setattr(library, "_CPP_LOADED", False)
    real = importlib.import_module

    def no_extension(name, *a, **kw):
        if name == "drople_fast._C":
            raise ImportError("simulated: not built")
        return real(name, *a, **kw)

    monkeypatch.setattr(library.importlib, "import_module", no_extension)
    assert "pip install --no-build-isolation -e ." in library.cpp_extension_error()
    rows = dict(info.report())
    assert rows["rebuild"].startswith("pip install --no-build-isolation -e .")
    assert re.match(r"bf16 \d+ / fp32 \d+ GFLOP/s \(\d+\.\dx; measured now", rows["cpu gemm"]), rows["cpu gemm"]
    monkeypatch.undo()
    assert "rebuild" not in dict(info.report())


def test_drop_under_fullgraph_names_drop_fixed():
    import torch

    import drople_fast as df
    from drople_fast.ops.functional import DROP_FULLGRAPH
    from drople_fast.training.tiny_clip import create_tiny_clip

    model = create_tiny_clip(vision_cfg={"layers": 2}, text_cfg={"layers": 2})
    df.apply(model, df.IWTDConfig(mode="drop", backend="reference", vision_layers=(0,), text_layers=()))
    model.train()
    images = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception) as info:
            torch.compile(model.encode_image, fullgraph=True, backend="eager")(images)
        assert "use drop_fixed for fullgraph" in str(info.value) and DROP_FULLGRAPH in str(info.value)
        assert "\n" not in DROP_FULLGRAPH
        # without fullgraph the graph just breaks there, and eager is untouched
        torch._dynamo.reset()
        assert torch.compile(model.encode_image, backend="eager")(images).shape == (2, 32)
    finally:
        torch._dynamo.reset()
    assert model.encode_image(images).shape == (2, 32)


def test_fields_added_later_keep_old_fingerprints():
    from drople_fast.training import run_dir as rd
    from drople_fast.training.config import TrainConfig

    old_style = rd.fingerprint(TrainConfig().to_dict(), None, "")["config"]
    assert not set(old_style) & {"split_file", "image_dir", "template", "allow_fewer", "dataset_dir", "tensorboard"}
    changed = rd.fingerprint(TrainConfig(allow_fewer=True, template="{} fruit.").to_dict(), None, "")["config"]
    assert rd.fingerprint_diff(old_style, changed) == ["allow_fewer: '<absent>' -> True",
                                                       "template: '<absent>' -> '{} fruit.'"]
