"""The CLI end to end: outputs, records, reproduction, and one-line errors with exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from marble.cli import app

runner = CliRunner()
FAST = ["--model", "tiny-random", "--steps", "3", "--size", "32x32"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.exists() else []


def test_generate_twice_gives_byte_identical_files_and_never_overwrites(tmp_path):
    out = tmp_path / "out"
    r1 = run("generate", "a red circle", "--seed", 7, "--out", out, *FAST)
    r2 = run("generate", "a red circle", "--seed", 7, "--out", out, *FAST)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    files = pngs(out)
    assert [p.name for p in files] == ["marble-00000.png", "marble-00001.png"]
    assert files[0].read_bytes() == files[1].read_bytes()
    assert r1.stdout.strip() == str(files[0])


def test_png_record_layout_and_info(tmp_path):
    out = tmp_path / "out"
    r = run("generate", "two red circles", "--negative", "blurry", "--seed", 1, "--cfg", 7, "--sampler",
            "Euler a", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    path = pngs(out)[0]
    params = Image.open(path).info["parameters"]
    lines = params.split("\n")
    assert lines[0] == "two red circles"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 32x32, Model hash: ")
    assert ", Model: tiny-random" in lines[2]
    info = run("info", path)
    assert info.exit_code == 0 and info.stdout.strip() == params
    record = json.loads(run("info", path, "--json").stdout)
    assert record["seed"] == 1 and record["negative_prompt"] == "blurry" and record["mode"] == "txt2img"


def test_from_reproduces_exactly_including_img2img(tmp_path):
    out = tmp_path / "out"
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(init)
    r = run("generate", "a blue square", "--seed", 9, "--init-image", init, "--strength", 0.6, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    first = pngs(out)[0]
    again = run("generate", "--from", first, "--out", out)
    assert again.exit_code == 0, again.output
    second = Path(again.stdout.strip())
    assert second != first and second.read_bytes() == first.read_bytes()
    assert "Denoising strength: 0.6" in Image.open(first).info["parameters"]


def test_batch_files_carry_consecutive_seeds(tmp_path):
    out = tmp_path / "out"
    r = run("generate", "a shape", "--seed", 40, "-n", 2, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    seeds = [json.loads(Image.open(p).info["marble"])["seed"] for p in pngs(out)]
    assert seeds == [40, 41]


def bad_cases(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    small = tmp_path / "small.png"
    Image.new("L", (16, 16)).save(small)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    return {
        "unknown sampler": (["--sampler", "Bogus"], "sampler"),
        "steps zero": (["--steps", "0"], "steps"),
        "steps too many": (["--steps", "1001"], "steps"),
        "negative cfg": (["--cfg", "-1"], "cfg"),
        "size not multiple": (["--size", "33x32"], "multiple"),
        "size over limit": (["--size", "4096x4096"], "limit"),
        "bad size text": (["--size", "big"], "size"),
        "strength out of range": (["--init-image", img, "--strength", "1.5"], "strength"),
        "strength zero": (["--init-image", img, "--strength", "0"], "strength"),
        "mask size differs": (["--init-image", img, "--mask", small], "mask"),
        "init not an image": (["--init-image", text], "not a readable image"),
        "init missing": (["--init-image", tmp_path / "nope.png"], "cannot read"),
        "missing model": (["--model", tmp_path / "none.safetensors"], "no model"),
        "corrupt model": (["--model", corrupt], "corrupt"),
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    for name, (args, needle) in bad_cases(tmp_path).items():
        base = ["generate", "a circle", "--out", out, "--model", "tiny-random", "--steps", "2", "--size", "32x32"]
        # later flags win in typer, so the case's own --steps/--size/--model override the base
        r = run(*base, *args)
        assert r.exit_code == 2, (name, r.output)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("marble: error:") and needle in err[0], (name, r.stderr)
        assert "Traceback" not in r.output
        assert pngs(out) == [], name


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "marble", "generate", "x", "--model", "tiny-random",
                        "--sampler", "Nope", "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "unknown sampler" in p.stderr.lower() and "Traceback" not in p.stderr
    assert "Euler a" in p.stderr  # the message lists the valid names


def test_undecodable_prompt_bytes_are_a_usage_error(tmp_path):
    p = subprocess.run([sys.executable.encode(), b"-m", b"marble", b"generate", b"a \xff circle", b"--model",
                        b"tiny-random", b"--out", str(tmp_path).encode()], capture_output=True)
    assert p.returncode == 2 and b"not valid Unicode" in p.stderr and b"Traceback" not in p.stderr
    assert pngs(tmp_path) == []


def test_long_prompt_is_read_whole_without_a_warning(tmp_path):
    """Past 75 tokens the prompt takes another window (docs/prompts.md): nothing is cut, nothing warns."""
    r = run("generate", " ".join(["circle"] * 100), "--seed", 1, "--out", tmp_path, *FAST)
    assert r.exit_code == 0
    assert "warning" not in r.stderr and "tokens" not in r.stderr


def test_empty_prompt_is_allowed_and_said(tmp_path):
    r = run("generate", "", "--seed", 1, "--out", tmp_path, *FAST)
    assert r.exit_code == 0 and "unconditional" in r.stderr
    assert len(pngs(tmp_path)) == 1


def test_samplers_lists_every_registered_name():
    from marble.diffusion.samplers import SAMPLERS
    r = run("samplers")
    assert r.exit_code == 0
    for name in SAMPLERS:
        assert any(line.startswith(name + " ") for line in r.stdout.splitlines()), name


def test_info_on_non_png_is_an_error(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    r = run("info", p)
    assert r.exit_code == 2 and "marble: error" in r.stderr


def test_bench_model_reports_medians_of_what_it_timed(tmp_path):
    """`marble bench --model`: warm images and cold CLI runs, medians of the very lists it reports."""
    out = tmp_path / "speed.json"
    r = run("bench", "--model", "tiny-random", "--runs", 3, "--cold-runs", 1, "--json", out)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data["warm_image_s"]) == 3 and len(data["cold_cli_s"]) == 1
    assert data["warm_image_median_s"] == sorted(data["warm_image_s"])[1] > 0
    assert data["cold_cli_median_s"] == data["cold_cli_s"][0] > data["warm_image_median_s"]
    assert "| one image, warm (median of 3) |" in r.stdout and "20 steps" in data["settings"]
    assert data["cpu"] and f"| CPU | {data['cpu']} |" in r.stdout
    again = run("bench", "--model", "tiny-random", "--runs", 1, "--json", out)      # never overwritten
    assert again.exit_code == 2 and "exists" in again.output
    bad = run("bench", "--model", "no-such-model", "--runs", 1)
    assert bad.exit_code == 2 and "no model named" in bad.output


def test_outputs_get_the_mode_a_plain_open_would_give(tmp_path):
    """Atomic writes go through mkstemp (0600); the finished file has 0666 less the umask."""
    import os
    from marble.fileio import write_new, write_replace
    mask = os.umask(0o022)
    os.umask(mask)
    a, b = write_new(tmp_path / "a.bin", b"x"), write_replace(tmp_path / "b.bin", b"y")
    assert {a.stat().st_mode & 0o777, b.stat().st_mode & 0o777} == {0o666 & ~mask}


def test_the_shipped_builtin_model_is_the_default_and_named_in_the_record(tmp_path):
    """models/builtin.safetensors loads without a flag; its name and A1111 hash (sha256 of the
    file, first 10 hex) are in the PNG record, at the model's own defaults."""
    import hashlib
    shipped = Path(__file__).resolve().parents[1] / "models" / "builtin.safetensors"
    assert shipped.stat().st_size <= 40 * 2**20
    r = run("generate", "two red circles above a blue square", "--seed", 7, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    record = run("info", pngs(tmp_path)[0], "--json")
    data = json.loads(record.stdout)
    want = hashlib.sha256(shipped.read_bytes()).hexdigest()[:10]
    assert (data["model_name"], data["model_hash"]) == ("builtin", want)
    assert (data["steps"], data["sampler"], data["cfg"], data["width"]) == (15, "DPM++ 2M Karras", 4.0, 64)
