"""--threads and --dtype: the CPU probe on other machines' cpuinfo, the plumbing from each command to
torch and the loader, the warning and exit 2, OpenMP's wait policy, and bf16 against fp32."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from marble import cpu_features
from marble.cli import app
from marble.cpu_features import cpu_flags, cpu_label, cpu_name, dtype_name, dtype_warning, native_bf16, resolve_dtype
from marble.errors import ModelLoadError
from marble.threads import SPIN_COUNT, quiet_spin

runner = CliRunner()

# first lines of /proc/cpuinfo on the three development machines (flags abridged)
AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
BF16_EPYC = AVX2_EPYC.replace("sha_ni", "sha_ni avx512f avx512bw avx512_bf16 avx512_vnni").replace(
    "AMD EPYC", "AMD EPYC 9R14")
AMX_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
processor\t: 1
flags\t\t: fpu
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16 i8mm\n"


def test_cpu_probe_reads_name_and_flags_of_each_machine():
    assert cpu_name(AVX2_EPYC) == "AMD EPYC"
    assert cpu_name(AMX_XEON) == "Intel(R) Xeon(R) Platinum 8488C"
    assert "avx2" in cpu_flags(AVX2_EPYC) and "amx_bf16" in cpu_flags(AMX_XEON)
    assert "bf16" in cpu_flags(ARM)
    assert [native_bf16(t) for t in (AVX2_EPYC, BF16_EPYC, AMX_XEON, "")] == [False, True, True, False]
    assert [cpu_label(t) for t in (AVX2_EPYC, BF16_EPYC, AMX_XEON)] == [
        "AMD EPYC (avx2)", "AMD EPYC 9R14 (avx2 avx512f avx512_bf16)",
        "Intel(R) Xeon(R) Platinum 8488C (avx2 avx512f avx512_bf16 amx_bf16)"]


def test_auto_dtype_is_bf16_only_where_native():
    assert resolve_dtype("auto", AVX2_EPYC) == "fp32"
    assert resolve_dtype("auto", BF16_EPYC) == "bf16"
    assert resolve_dtype("auto", AMX_XEON) == "bf16"
    assert [resolve_dtype(n, AVX2_EPYC) for n in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="--dtype must be one of auto, fp32, bf16, fp16"):
        resolve_dtype("float64", AMX_XEON)
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def test_bf16_warns_with_its_cost_only_without_native_bf16():
    message = dtype_warning("bf16", AVX2_EPYC)
    assert "no native bf16" in message and f"about {cpu_features.EMULATED_BF16_SLOWDOWN}x slower" in message
    assert dtype_warning("bf16", AMX_XEON) is None
    assert dtype_warning("fp32", AVX2_EPYC) is None


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def caught_load(monkeypatch):
    """load_pipeline replaced by a stub that notes the dtype and torch's threads, then refuses."""
    seen = {}

    def fake_load(model=None, dtype=torch.float32, trace=False, **_):
        seen.update(dtype=dtype, threads=torch.get_num_threads(), trace=trace)
        raise ModelLoadError("stub: not loading")

    monkeypatch.setattr("marble.pipeline.load_pipeline", fake_load)
    monkeypatch.setattr(cpu_features, "cpuinfo_text", lambda: AVX2_EPYC)
    return seen


COMMANDS = {
    "generate": ["generate", "a red circle"],
    "serve": ["serve", "--port", "0"],
    "eval": ["eval", "--prompts", "1", "--json", "{tmp}/e.json"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_threads_and_dtype_reach_torch_and_the_loader(command, caught_load, restore_threads, tmp_path):
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    r = runner.invoke(app, args + ["--threads", "1", "--dtype", "bf16"] + (["--trace"] if command != "generate" else []))
    assert r.exit_code == 2 and "stub: not loading" in r.output, r.output
    assert caught_load == {"dtype": torch.bfloat16, "threads": 1, "trace": command != "generate"}
    assert r.output.count("no native bf16") == 1      # warned once, with the cost
    torch.set_num_threads(2)
    r = runner.invoke(app, args + ["--dtype", "auto"])
    assert caught_load == {"dtype": torch.float32, "threads": 2, "trace": False}   # AVX2: fp32; 0 threads: as it was
    assert "warning" not in r.output
    runner.invoke(app, args, env={"MARBLE_DTYPE": "bf16"})   # the option's default from the environment
    assert caught_load["dtype"] == torch.bfloat16


def test_bench_times_fp32_unless_told_and_its_dtype_reaches_the_loader(caught_load):
    args = ["bench", "--model", "builtin", "--runs", "1", "--cold-runs", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "stub: not loading" in r.output and caught_load["dtype"] == torch.float32
    r = runner.invoke(app, args + ["--dtype", "bf16"], env={"MARBLE_DTYPE": "fp16"})   # bench ignores the env
    assert caught_load["dtype"] == torch.bfloat16 and r.output.count("no native bf16") == 1
    caught_load.clear()
    r = runner.invoke(app, args + ["--dtype", "int8"])
    assert r.exit_code == 2 and "--dtype must be one of" in r.output and caught_load == {}
    r = runner.invoke(app, ["bench", "--dtype", "bf16"])
    assert r.exit_code == 2 and "--dtype is an option of --model" in r.output and caught_load == {}


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_dtype_and_negative_threads_exit_2_before_loading(command, caught_load, tmp_path):
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    r = runner.invoke(app, args + ["--dtype", "int8"])
    assert r.exit_code == 2 and "--dtype must be one of auto, fp32, bf16, fp16, not 'int8'" in r.output
    r = runner.invoke(app, args + ["--threads", "-1"])
    assert r.exit_code == 2 and "--threads must be >= 0" in r.output
    assert caught_load == {}
    assert not (tmp_path / "e.json").exists()


def _spin_env(env: dict) -> str:
    code = "import os, marble.cli, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | env
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_cli_shortens_openmp_spinning_unless_the_user_chose():
    assert _spin_env({}) == SPIN_COUNT
    assert _spin_env({"GOMP_SPINCOUNT": "123"}) == "123"
    assert _spin_env({"OMP_WAIT_POLICY": "ACTIVE"}) == "None"
    assert quiet_spin({}) is False       # torch is imported here: too late to matter, and said so


def _image(pipe, **kw) -> np.ndarray:
    from marble.request import GenerationRequest, resolve
    req = resolve(GenerationRequest(prompt="two red circles above a blue square", seed=3, steps=4, width=32,
                                    height=32), pipe.defaults)
    result = pipe.generate(req)
    return np.asarray(result.images[0], dtype=np.float64), result.records[0]


def test_bf16_image_of_the_builtin_model_is_within_35_db_of_fp32():
    """bf16 weights and activations (fp32 sampler state and GroupNorm statistics): 45 dB measured at
    the default 15 steps and 64×64, so 35 dB leaves room without hiding a wrong cast (an image from
    another seed scores about 10 dB)."""
    from marble.pipeline import load_pipeline
    fp32, rec32 = _image(load_pipeline("builtin"))
    bf16, rec16 = _image(load_pipeline("builtin", torch.bfloat16))
    psnr = 10 * np.log10(255**2 / ((fp32 - bf16) ** 2).mean())
    assert psnr >= 35, psnr
    assert (rec32.dtype, rec16.dtype) == ("fp32", "bf16")
    assert json.loads(rec16.to_json())["dtype"] == "bf16"


def test_png_states_the_dtype(tmp_path, restore_threads):
    out = tmp_path / "out"
    r = runner.invoke(app, ["generate", "a red circle", "--model", "tiny-random", "--steps", "2", "--size", "32x32",
                            "--dtype", "fp32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    record = json.loads(Image.open(next(out.glob("*.png"))).info["marble"])
    assert record["dtype"] == "fp32"
