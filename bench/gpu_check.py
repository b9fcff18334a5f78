"""The GPU check of drople_fast: one script that cannot pass by accident.

    python bench/gpu_check.py                 # on a CUDA machine; exits 2 without CUDA
    python bench/gpu_check.py --cpu-dry       # the same steps on CPU, tiny shapes (CI runs this)

Steps (each with its own timeout, and with ``--budget-s`` at most what is left of the budget; any failure,
mismatch, timeout or skipped step makes the exit status 1; the JSON/Markdown are rewritten after each step):

1. ``env``        device, capability, torch / triton / open_clip versions;
2. ``masks``      Triton (on the device) vs the reference (on the device) vs the C++ operator (CPU)
                  at real shapes, several seeds: scores within the harness tolerances, integer outputs
                  identical, and masks identical except for draws within 1e-5 of p, on at most 0.1 %
                  of tokens (approximate exp/div and FMA on the GPU; README "cross-device");
3. ``determinism`` two runs of the Triton op give the same bits;
4. ``modes``      the patched model in every mode on the device: Triton backend vs reference backend
                  (same seed) give the same features, losses and gradients are finite;
5. ``compiled``   a ``torch.compile(fullgraph=True)`` drop_fixed training step matches eager;
6. ``speed_op``   the op vs the ViT-B/16 block it follows (batch 4, 32) and vs the text block for
                  1,000 prompts, bf16, CUDA events;
7. ``speed_step`` the training step off / perturb / drop / drop_fixed / PatchDropout at batch 4 and 32
                  under bf16 autocast, with the SDPA kernel that ran.

Results go to ``bench/results/gpu_check-<device>.json`` and ``.md`` (and to ``$OUT`` if set), with
the device named. On a fresh H200 with torch and triton preinstalled the whole run is meant to take
under 8 minutes (Triton and inductor compile times included); ``--only`` runs a subset.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

DRY = "--cpu-dry" in sys.argv
if DRY:  # the Triton interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import torch  # noqa: E402

MAX_MASK_MISMATCH_RATE = 1e-3  # as tests/test_triton_kernels.py
MAX_MISMATCH_GAP = 1e-5  # as tests/iwtd_harness.py
STEPS = ("env", "masks", "determinism", "modes", "compiled", "speed_op", "speed_step")
TIMEOUT_S = {"env": 60, "masks": 150, "determinism": 60, "modes": 120, "compiled": 150, "speed_op": 90,
             "speed_step": 150}


class StepTimeout(Exception):
    pass


class CheckFailed(AssertionError):
    pass


def require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


@contextlib.contextmanager
def time_limit(seconds: int):
    def fire(signum, frame):
        raise StepTimeout(f"step exceeded {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Check:
    def __init__(self, dry: bool):
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.results: dict = {}

    # ------------------------------------------------------------------ helpers
    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, iters: int, warmup: int = 2) -> float:
        """Median milliseconds of ``fn`` (CUDA events on the GPU, wall clock on the CPU)."""
        iters, warmup = (1, 1) if self.dry else (iters, warmup)
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"CPU {platform.machine()} ({os.cpu_count()} cores, dry run)"

    def model(self):
        """ViT-B/16 CLIP (random weights: speed and agreement do not need trained ones); tiny CLIP dry."""
        if self.dry:
            from drople_fast.training.tiny_clip import create_tiny_clip

            return create_tiny_clip().to(self.device)
        import open_clip

        torch.manual_seed(0)
        return open_clip.create_model("ViT-B-16", pretrained=None).to(self.device)

    # ------------------------------------------------------------------ steps
    def step_env(self):
        import triton

        info = dict(device=self.device_name(), torch=torch.__version__, triton=triton.__version__,
                    python=platform.python_version(), dry=self.dry)
        if self.device.type == "cuda":
            info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(self.device)
            info["cuda"] = torch.version.cuda
        try:
            import open_clip

            info["open_clip"] = open_clip.__version__
        except ImportError as err:
            info["open_clip"] = f"missing: {err}"
        from drople_fast.ops.backends import describe

        info["backends"] = dict(describe())
        require(info["backends"].get(f"triton [{self.device.type}]") == "usable", f"triton unusable: {info['backends']}")
        return info

    def mask_cases(self):
        from iwtd_harness import Case

        if self.dry:
            return [("vit-tiny", Case(2, 2, 17, Dh=16, D=32, M=8, dtype=torch.float16)),
                    ("text-tiny", Case(3, 2, 11, Dh=16, D=32, M=8, causal=True, padded=True, anchor="eos",
                                       dtype=torch.bfloat16))]
        cases = []
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            cases.append((f"vit-b16 {dtype}", Case(32, 12, 201, Dh=64, D=768, M=64, P=512, dtype=dtype)))
        cases += [
            ("vit-l14-336 Dh64 M128", Case(4, 16, 577, Dh=64, D=1024, M=128, P=512, dtype=torch.bfloat16)),
            ("vit-h14 Dh80", Case(8, 16, 257, Dh=80, D=1280, M=64, P=512, dtype=torch.bfloat16)),
            ("Dh128 fp16", Case(8, 12, 201, Dh=128, D=768, M=128, P=512, dtype=torch.float16)),
            ("text x1000", Case(1000, 8, 77, Dh=64, D=512, M=64, P=512, causal=True, padded=True, anchor="eos",
                                dtype=torch.bfloat16)),
        ]
        return cases

    def step_masks(self):
        from iwtd_harness import TOLERANCE, make_inputs, run

        from drople_fast.ops.backends import BACKENDS
        from drople_fast.ops.philox import token_uniform

        cpp_ok = BACKENDS["cpp"].why_not(torch.device("cpu"), torch.float32) is None
        rows, failures = [], []
        for name, case in self.mask_cases():
            for seed in ((0, 2**40 + 3) if self.dry else (0, 1, 2**40 + 3)):
                case = dataclasses.replace(case, seed=seed)
                inputs = make_inputs(case, device=self.device, generator_seed=seed)
                ref = run(inputs, "reference")
                got = run(inputs, "triton")
                row = dict(case=name, seed=seed, tokens=int(ref.drop_mask.numel()))
                others = {"triton": got}
                if cpp_ok:
                    cpu_inputs = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in inputs.items()}
                    try:
                        others["cpp"] = run(cpu_inputs, "cpp")
                    except ValueError as err:  # a dtype the C++ operator refuses: say so, do not fail
                        row["cpp"] = f"refused: {err}"
                u = token_uniform(seed, *ref.drop_mask.shape)
                for backend, out in others.items():
                    try:
                        tol = TOLERANCE[case.dtype]
                        torch.testing.assert_close(out.importance.cpu(), ref.importance.cpu(), **tol)
                        torch.testing.assert_close(out.drop_prob.cpu(), ref.drop_prob.cpu(), **tol)
                        differ = out.drop_mask.cpu() != ref.drop_mask.cpu()
                        n = int(differ.sum())
                        gap = float((u - ref.drop_prob.cpu()).abs()[differ].max()) if n else 0.0
                        row[f"{backend}_mask_mismatches"] = n
                        row[f"{backend}_max_gap"] = gap
                        require(gap < MAX_MISMATCH_GAP, f"{backend} mask differs away from p (gap {gap})")
                        require(n / differ.numel() <= MAX_MASK_MISMATCH_RATE, f"{backend}: {n} mask mismatches")
                        if n == 0:
                            require(torch.equal(out.keep_order.cpu(), ref.keep_order.cpu()), f"{backend} keep_order")
                            require(torch.equal(out.keep_count.cpu(), ref.keep_count.cpu()), f"{backend} keep_count")
                    except AssertionError as err:
                        failures.append(f"{name} seed {seed} {backend}: {str(err).splitlines()[0]}")
                rows.append(row)
        require(not failures, "; ".join(failures))
        return rows

    def step_determinism(self):
        from iwtd_harness import make_inputs, run

        name, case = self.mask_cases()[0]
        inputs = make_inputs(case, device=self.device, generator_seed=7)
        first, second = run(inputs, "triton"), run(inputs, "triton")
        for field in ("importance", "drop_prob", "drop_mask", "keep_count", "keep_order"):
            require(torch.equal(getattr(first, field), getattr(second, field)), f"{field} differs between runs")
        return dict(case=name, identical=True)

    def _images_text(self, model, batch):
        import open_clip

        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(self.device)
        text = open_clip.tokenize([f"a photo of a thing number {i}." for i in range(batch)]).to(self.device)
        return images, text

    def step_modes(self):
        import drople_fast as df

        model = self.model()
        model.train()
        images, text = self._images_text(model, 2 if self.dry else 8)
        rows = []
        for mode in ("off", "perturb", "drop", "drop_fixed"):
            feats = {}
            for backend in ("reference", "triton"):
                m = copy.deepcopy(model)
                torch.manual_seed(0)  # the bridge module that apply() adds is initialised from the global RNG
                df.apply(m, df.IWTDConfig(mode=mode, backend=backend, seed=3, **self.layers()))
                img = m.encode_image(images)
                txt = m.encode_text(text)
                loss = img.float().square().mean() + txt.float().square().mean()
                loss.backward()
                grads = [p.grad for p in m.parameters() if p.grad is not None]
                require(torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads),
                        f"{mode}/{backend}: non-finite loss or gradient")
                feats[backend] = (img.detach().float(), txt.detach().float())
            err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                      for a, b in zip(feats["triton"], feats["reference"]))
            rows.append(dict(mode=mode, rel_err_triton_vs_reference=err))
            require(err < 1e-3, f"{mode}: triton and reference backends disagree (rel err {err:.2e})")
        return rows

    def layers(self) -> dict:
        """IWTD layers: the release's (vision 0-5, text 0-8); two per tower in the dry run (interpreter)."""
        return dict(vision_layers=(0, 1), text_layers=(0, 1)) if self.dry else {}

    def step_compiled(self):
        import drople_fast as df

        model = self.model()
        model.train()
        torch.manual_seed(0)
        df.apply(model, df.IWTDConfig(mode="drop_fixed", vision_layers=(0,), text_layers=(), keep_ratio=0.5, seed=1,
                                      backend="triton"))
        twin = copy.deepcopy(model)  # same bridge and step counters: eager and compiled see the same seeds
        images, _ = self._images_text(model, 2 if self.dry else 8)

        def loss_of(m):
            return lambda x: m.encode_image(x).float().square().mean()

        from torch import _dynamo

        _dynamo.reset()
        compiled = torch.compile(loss_of(twin), fullgraph=True, backend="aot_eager" if self.dry else "inductor")
        rows = []
        for step in range(2):
            eager = loss_of(model)(images)
            eager.backward()
            got = compiled(images)
            got.backward()
            e, g = float(eager.detach()), float(got.detach())
            rel = abs(g - e) / max(abs(e), 1e-30)
            grad_err = max(float((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp(min=1e-30))
                           for p, q in zip(model.parameters(), twin.parameters()) if p.grad is not None)
            rows.append(dict(step=step, eager=e, compiled=g, rel_err=rel, grad_rel_err=grad_err))
            require(rel < 1e-3 and grad_err < 1e-2, f"compiled drop_fixed step differs from eager: loss {rel:.2e}, "
                    f"grad {grad_err:.2e}")
        return rows

    def step_speed_op(self):
        """The Triton op (three kernels) and the full df.iwtd call vs one block forward, bf16."""
        import drople_fast as df
        from iwtd_harness import Case, make_inputs

        from drople_fast.kernels.iwtd_triton import iwtd_triton_op
        from drople_fast.ops.primitives import fold_bridge

        dt = torch.float16 if self.dry else torch.bfloat16
        model = self.model()
        vit_width = model.visual.transformer.width
        txt_width = model.transformer.width
        vit_heads = model.visual.transformer.resblocks[0].attn.num_heads
        txt_heads = model.transformer.resblocks[0].attn.num_heads
        n_vis = (model.visual.grid_size[0] * model.visual.grid_size[1]) + 1 + 4  # + CLS + 4 visual prompts
        if self.dry:
            cases = [("vision b2", 2, n_vis, vit_width, vit_heads, model.visual.transformer.resblocks[0], False)]
        else:
            cases = [(f"vision b{b}", b, n_vis, vit_width, vit_heads, model.visual.transformer.resblocks[0], False)
                     for b in (4, 32)]
            cases.append(("text x1000", 1000, 77, txt_width, txt_heads, model.transformer.resblocks[0], True))
        rows = []
        for name, B, S, D, H, block, causal in cases:
            block = copy.deepcopy(block).to(dt).eval()
            x = torch.randn(B, S, D, device=self.device, dtype=dt)
            mask = torch.full((S, S), float("-inf"), device=self.device, dtype=dt).triu(1) if causal else None
            case = Case(B, H, S, Dh=D // H, D=D, M=64 if not self.dry else 8, P=512 if not self.dry else 16,
                        causal=causal, padded=causal, anchor="eos" if causal else "first", dtype=dt)
            inputs = make_inputs(case, device=self.device)
            folded, shift = fold_bridge(inputs["bridge_tokens"], inputs["bridge_weight"], inputs["bridge_bias"])
            valid = inputs["valid"] if inputs["valid"] is not None else torch.ones(B, S, dtype=torch.bool,
                                                                                  device=self.device)
            seed = torch.tensor([1], dtype=torch.int64, device=self.device)
            op_args = (inputs["q"], inputs["k"], inputs["hidden"], inputs["eligible"], valid,
                       inputs["anchor_index"].to(torch.int64), folded, shift, causal, 0.1, 0.5, seed)
            with torch.no_grad():
                t_block = self.time_ms(lambda: block(x, attn_mask=mask), iters=20)
                t_op = self.time_ms(lambda: iwtd_triton_op(*op_args), iters=20)
                t_api = self.time_ms(lambda: df.iwtd(**inputs, backend="triton"), iters=20)
                t_ref = self.time_ms(lambda: df.iwtd(**inputs, backend="reference"), iters=5)
            rows.append(dict(case=name, batch=B, S=S, D=D, heads=H, block_ms=t_block, op_ms=t_op, api_ms=t_api,
                             reference_ms=t_ref, op_over_block=t_op / t_block, api_over_block=t_api / t_block))
        return rows

    def step_speed_step(self):
        import open_clip
        from bench_e2e import IMAGE_CASES, VisualPrompts, image_step

        import drople_fast as df

        model = self.model()
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
        rows = []
        for batch in ((2,) if self.dry else (4, 32)):
            images, _ = self._images_text(model, batch)
            for case in ("off", "perturb", "drop", "drop_fixed", "patchdropout"):
                spec = IMAGE_CASES[case]
                hook = VisualPrompts(model.visual.transformer.width).to(self.device)
                row = dict(case=case, batch=batch)
                try:
                    if isinstance(spec, dict):
                        cfg = {"vision_layers": (), **spec, "backend": "triton"}
                        if self.dry and cfg["vision_layers"]:
                            cfg["vision_layers"] = self.layers()["vision_layers"]
                        df.apply(model, df.IWTDConfig(text_layers=(), **cfg))
                        df.set_prompt_hook(model, hook)
                        step = image_step(model, images, hook, True)
                    else:
                        old = model.visual.patch_dropout
                        model.visual.patch_dropout = open_clip.transformer.PatchDropout(0.5)
                        step = image_step(model, images, hook, False)
                    autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)

                    def run_step():
                        with autocast:
                            return step()

                    row["ms"] = self.time_ms(run_step, iters=10)
                    row["sdpa_kernels"] = sdpa_kernels(run_step)
                except Exception as err:  # recorded per row; the step fails below
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                finally:
                    if isinstance(spec, dict):
                        with contextlib.suppress(Exception):  # not patched if apply itself failed
                            df.remove(model)
                    else:
                        model.visual.patch_dropout = old
                rows.append(row)
        errors = [f"{r['case']} b{r['batch']}: {r['error']}" for r in rows if "error" in r]
        require(not errors, "; ".join(errors))
        return rows


def sdpa_kernels(fn) -> list:
    """Names of the scaled-dot-product-attention implementations that ran during ``fn`` (aten op names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    return sorted(n for n in names if "scaled_dot_product" in n or "flash_attention" in n
                  or "efficient_attention" in n or "cudnn_attention" in n)


def to_markdown(report: dict) -> str:
    lines = [f"# drople_fast GPU check: {report['device']}", "",
             f"{'DRY RUN on CPU (tiny shapes, interpreter): numbers are meaningless' if report['dry'] else ''}",
             "", "| step | status | seconds |", "|---|---|---|"]
    for name in STEPS:
        if name in report["steps"]:
            s = report["steps"][name]
            lines.append(f"| {name} | {s['status']}{': ' + s['error'][:120] if s.get('error') else ''} | "
                         f"{s['seconds']:.1f} |")
    for name in ("speed_op", "speed_step", "masks"):
        rows = report["steps"].get(name, {}).get("result")
        if isinstance(rows, list) and rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for r in rows:
                lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry", action="store_true", help="run every step on CPU with tiny shapes (CI)")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON/Markdown")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock seconds for all steps together: a step gets at most what is left, and "
                             "the steps after the budget is spent are recorded as skipped (bench/gpu_check.sh "
                             "passes what is left of its 8 minutes)")
    args = parser.parse_args(argv)
    if not args.cpu_dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; this check refuses to run without one (use --cpu-dry in CI)",
              file=sys.stderr)
        return 2
    check = Check(dry=args.cpu_dry)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(STEPS)
    if unknown:
        parser.error(f"--only: unknown steps {sorted(unknown)}; choose from {STEPS}")
    report = dict(dry=check.dry, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), steps={})
    device = check.device_name()
    report["device"] = device
    slug = "cpu-dry" if check.dry else "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    outs = [Path(args.out)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    for name in STEPS:
        if name not in only:
            continue
        t0 = time.perf_counter()
        entry = {}
        limit = TIMEOUT_S[name] * args.timeout_scale
        if deadline is not None:
            limit = min(limit, deadline - t0)
        try:
            if limit < 1:
                entry.update(status="skipped", error="the budget (--budget-s) was spent before this step")
            else:
                with time_limit(int(limit)):
                    entry["result"] = getattr(check, f"step_{name}")()
                entry["status"] = "ok"
        except StepTimeout as err:
            entry.update(status="timeout", error=str(err))
        except CheckFailed as err:
            entry.update(status="FAIL", error=str(err))
        except Exception as err:
            entry.update(status="ERROR", error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-2000:])
        entry["seconds"] = time.perf_counter() - t0
        report["steps"][name] = entry
        print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']:.1f} s)"
              f"{'  ' + entry['error'][:300] if entry.get('error') else ''}", flush=True)
        report["env"] = report["steps"].get("env", {})
        # after every step: a run killed from outside still leaves the steps it finished
        for out in outs:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"gpu_check-{slug}.json").write_text(json.dumps(report, indent=1, default=str))
            (out / f"gpu_check-{slug}.md").write_text(to_markdown(report))
    bad = [n for n, s in report["steps"].items() if s["status"] != "ok"]
    print(f"gpu_check: {'FAILED: ' + ', '.join(bad) if bad else 'all steps passed'} on {device}; "
          f"results in {outs[0]}/gpu_check-{slug}.json", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
