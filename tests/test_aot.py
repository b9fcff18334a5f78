"""The ahead-of-time kernel checker (drople_fast/ops/aot.py): parsing, exit status, a real compile.

The real compile needs Triton's wheel (ptxas ships in it) but no GPU.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from drople_fast.ops import aot  # noqa: E402
from drople_fast.kernels.registry import MatrixPoint, configs_for, full_matrix  # noqa: E402

# Verbatim ptxas -v output (Triton 3.8 wheel, ptxas 12.9) of the former one-program-per-sample kernel, sm_90a.
SPILLING_LOG = """ptxas info    : Compiling entry function '_iwtd_fused_kernel' for 'sm_90a'
ptxas info    : Function properties for _iwtd_fused_kernel
    2176 bytes stack frame, 2448 bytes spill stores, 2720 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2176 bytes cumulative stack size
ptxas info    : Compile time = 1040.636 ms
"""
CLEAN_LOG = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 1024 bytes smem, 384 bytes cmem[0]
"""


def test_parse_ptxas():
    assert aot.parse_ptxas(SPILLING_LOG) == dict(registers=255, spill_stores=2448, spill_loads=2720,
                                                 shared_static=0, stack_bytes=2176)
    assert aot.parse_ptxas(CLEAN_LOG) == dict(registers=96, spill_stores=0, spill_loads=0, shared_static=1024,
                                              stack_bytes=0)
    with pytest.raises(ValueError, match="no register count"):
        aot.parse_ptxas("ptxas fatal : something")


def test_tensor_core_counts():
    ptx = "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1}, ...;\n" \
          "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...;\n\tld.global.b32 %r2, [%rd1];\n"
    assert aot.count_tensor_core_ptx(ptx) == 2
    sass = "/*0a10*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n/*0a20*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4] ;\n"
    assert aot.count_tensor_core_sass(sass) == 2


def _fake_compile(outcome):
    def compile_one(config, cc):
        return dict(ok=True, registers=64, spill_stores=0, spill_loads=0, stack_bytes=0, shared_bytes=0,
                    mma_ptx=0, mma_sass=0, seconds=0.0) | outcome
    return compile_one


@pytest.mark.parametrize("outcome,status", [({}, 0), ({"spill_stores": 8}, 1), ({"spill_loads": 4}, 1),
                                            ({"ok": False, "error": "CompilationError: boom"}, 1)])
def test_exit_status(monkeypatch, capsys, outcome, status):
    monkeypatch.setattr(aot, "compile_one", _fake_compile(outcome))
    env = dict(os.environ)
    assert aot.main(["--quick", "--arch", "90", "--jobs", "1"]) == status
    # in-process, the checker leaves the environment alone (it once dropped TRITON_INTERPRET for
    # every test after it, so the Triton tests ran without the interpreter)
    assert dict(os.environ) == env
    out = capsys.readouterr().out
    assert ("SPILL" in out or "FAIL" in out) == bool(status)


def test_bad_arch_is_a_usage_error():
    with pytest.raises(SystemExit):
        aot.main(["--arch", "sm90"])


def test_registry_covers_the_matrix_and_dedupes():
    points = full_matrix()
    assert len(points) == 2 * 3 * 9 * 3 * 3 * 3 * 3
    todo = aot.collect(points[:40], [90])
    assert sum(len(p) for _, _, p in todo) >= 40  # every point is covered by at least one kernel config
    assert len({(c, cc) for c, cc, _ in todo}) == len(todo)
    for config in configs_for(points[0], 80):
        assert dict(config.signature).keys() == set(config.fn.arg_names)


def _aot(*args):
    # a fresh process: this test session runs Triton's interpreter, whose kernels cannot be compiled for a GPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return subprocess.run([sys.executable, "-m", "drople_fast.ops.aot", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_quick_matrix_compiles_without_spills_on_sm80_and_sm90():
    # The CI subset: the ViT-B/16 and text shapes and the widest fp32 corner, every kernel, both architectures.
    # Under whichever Triton is installed (CI's first leg: the newest; its second: triton 3.6), with its tiles.
    import triton

    proc = _aot("--quick", "--arch", "80,90", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"aot: triton {triton.__version__}:" in proc.stdout
    assert "0 failed, 0 spill" in proc.stdout
    for name in ("iwtd_scores", "bridge_logits", "iwtd_epilogue", "perturb_noise"):
        assert f"sm_80 {name}" in proc.stdout and f"sm_90 {name}" in proc.stdout


def test_noise_kernel_is_registered_with_its_launch_config():
    from drople_fast.kernels import noise_triton

    for dtype in ("fp32", "bf16", "fp16"):
        for D in (512, 768, 1024):
            point = MatrixPoint(False, dtype, 201, 12, 64, 64, D)
            (config,) = configs_for(point, 90, "perturb_noise")
            launch = noise_triton.config(D)  # what perturb_noise_triton launches
            assert dict(config.constexprs) == {"BLOCK": launch["BLOCK"]}
            assert (config.num_warps, config.num_stages) == (launch["num_warps"], launch["num_stages"])
            sig = dict(config.signature)
            assert (sig["h_ptr"], sig["out_ptr"], sig["sel_ptr"], sig["seed_ptr"]) == ("*" + dtype,) * 2 + ("*u8", "*i64")
            assert config.divisible == ("D",)  # S = 201 (and row_stride = S) are not multiples of 16


@pytest.mark.parametrize("version", [(3, 6), (3, 8)])
def test_checked_configs_follow_the_triton_version(monkeypatch, version):
    # The checker compiles what the launcher would launch under the installed Triton: both call the
    # kernels' config functions, which take the version from registry.triton_version.
    from drople_fast.kernels import iwtd_epilogue, iwtd_scores, registry

    monkeypatch.setattr(registry, "triton_version", lambda: version)
    point = MatrixPoint(True, "bf16", 17, 8, 80, 16, 512)
    for cc in (80, 90):
        configs = {c.name: c for c in configs_for(point, cc)}
        for name, launch in (("iwtd_scores", iwtd_scores.config("bf16", 17, 80, cc, version)),
                             ("iwtd_epilogue", iwtd_epilogue.config(17, 16, cc, version))):
            consts = dict(configs[name].constexprs)
            assert {k: consts[k] for k in launch if k.isupper()} == {k: v for k, v in launch.items() if k.isupper()}
            assert (configs[name].num_warps, configs[name].num_stages) == (launch["num_warps"], launch["num_stages"])
    # sm_90 tiles differ between the two (triton 3.6 spilled with 3.8's); the interpreter's (cc 0) do not
    assert iwtd_scores.config("bf16", 17, 80, 90, (3, 6)) != iwtd_scores.config("bf16", 17, 80, 90, (3, 8))
    assert iwtd_scores.config("bf16", 17, 80, 0, (3, 6)) == iwtd_scores.config("bf16", 17, 80, 0, (3, 8))
    assert iwtd_epilogue.config(1, 64, 0, (3, 6)) == iwtd_epilogue.config(1, 64, 0, (3, 8))


def test_triton_version_is_the_installed_one():
    import triton

    from drople_fast.kernels import registry

    assert registry.triton_version() == tuple(int(x) for x in triton.__version__.split(".")[:2])
