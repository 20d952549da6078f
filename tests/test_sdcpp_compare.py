"""benchmarks/sdcpp_compare.py without stable-diffusion.cpp: its log parsed on a recorded sample, the
sd.cpp path of a row run against a stand-in python that replays that log, the table and the JSON,
and bad input (exit 2, one line, nothing written). No test needs .venv-sdcpp or the network."""
import json
import stat

import pytest

from test_benchmarks import load_script

# recorded: stable-diffusion-cpp-python 0.4.7's stderr (verbose=True) in the 128² 1-step smoke run,
# the timing lines and those around them (the whole log is 50 lines of this kind)
LOG = """\
stable-diffusion.cpp:305  - Version: SD 1.x 
model.cpp:993  - loading tensors completed, taking 3.77s (process: 0.00s, read: 3.61s, memcpy: 0.00s, convert: 0.01s, copy_to_backend: 0.00s)
conditioner.hpp:541  - computing condition graph completed, taking 921 ms
conditioner.hpp:541  - computing condition graph completed, taking 1529 ms
stable-diffusion.cpp:3168 - get_learned_condition completed, taking 2.46s
stable-diffusion.cpp:3401 - generating image: 1/1 - seed 0
ggml_extend.hpp:1921 - unet compute buffer size: 14.12 MB(RAM)
stable-diffusion.cpp:3432 - sampling completed, taking 7.00s
stable-diffusion.cpp:3450 - generating 1 latent images completed, taking 7.00s
stable-diffusion.cpp:3192 - decoding 1 latents
ggml_extend.hpp:1921 - vae compute buffer size: 104.00 MB(RAM)
vae.hpp:207  - computing vae decode graph completed, taking 11.10s
stable-diffusion.cpp:3208 - latent 1 decoded, taking 11.10s
stable-diffusion.cpp:3212 - decode_first_stage completed, taking 11.10s
stable-diffusion.cpp:3591 - generate_image completed in 20.57s
"""
LOAD_S, TEXT_S, SAMPLING_S, DECODE_S, IMAGE_S = 3.77, 2.46, 7.00, 11.10, 20.57


@pytest.fixture(scope="module")
def script():
    return load_script("sdcpp_compare")


def test_the_sdcpp_log_gives_each_phase_and_the_last_match_wins(script):
    parsed = script.parse_sdcpp_log(LOG)
    assert parsed == {"text_encoding_s": TEXT_S, "unet_steps_s": SAMPLING_S, "vae_decode_s": DECODE_S,
                      "log_load_s": LOAD_S, "log_image_s": IMAGE_S}
    again = script.parse_sdcpp_log(LOG + "stable-diffusion.cpp:3432 - sampling completed, taking 9.50s\n")
    assert again["unet_steps_s"] == 9.5
    assert script.parse_sdcpp_log("nothing here") == dict.fromkeys(script.SDCPP_LOG)


def test_the_result_is_the_last_marked_line_among_other_output(script):
    mark = script.RESULT_MARK
    out = f"noise\n{mark}{{\"a\": 1}}\nprogress 3/3\n{mark}{{\"a\": 2}}\ntrailing\n"
    assert script.result_line(out) == {"a": 2}
    with pytest.raises(RuntimeError, match="no result line"):
        script.result_line("noise only\n")


@pytest.mark.parametrize("name, kind, flags", [("marble", "marble", []), ("marble-fp16-lowmem", "marble", ["fp16", "lowmem"]),
                                               ("diffusers", "diffusers", []), ("sdcpp", "sdcpp", []),
                                               ("sdcpp-q8_0-fa-direct", "sdcpp", ["q8_0", "fa", "direct"])])
def test_engine_names(script, name, kind, flags):
    assert script.parse_engine(name) == {"name": name, "kind": kind, "flags": flags}


@pytest.mark.parametrize("name", ["comfy", "sdcpp-q9", "sdcpp-f16-q8_0", "sdcpp-fa-fa", "diffusers-fp16", "marble-fa", ""])
def test_bad_engine_names_are_refused(script, name):
    with pytest.raises(ValueError):
        script.parse_engine(name)


def test_sdcpp_flags_become_the_0_4_keyword_arguments(script):
    assert script.sdcpp_options([]) == {"wtype": "default", "flash_attn": False, "diffusion_flash_attn": False,
                                        "diffusion_conv_direct": False, "vae_conv_direct": False,
                                        "vae_decode_only": True}
    o = script.sdcpp_options(["q8_0", "fa", "direct"])
    assert o["wtype"] == "q8_0" and o["flash_attn"] and o["diffusion_flash_attn"]
    assert o["diffusion_conv_direct"] and o["vae_conv_direct"]


def fake_python(tmp_path, log: str, result: dict, rc: int = 0):
    """A stand-in for .venv-sdcpp/bin/python: records its arguments, replays a log on stderr, prints
    the driver's result line, exits with `rc`."""
    (tmp_path / "log.txt").write_text(log)
    (tmp_path / "result.json").write_text(json.dumps(result))
    exe = tmp_path / "python"
    exe.write_text(f"""#!/bin/sh
printf '%s' "$3" > {tmp_path}/args.json
cat {tmp_path}/log.txt >&2
echo "progress bar 3/3"
printf '%s' "{script_mark()}"; cat {tmp_path}/result.json; echo
exit {rc}
""")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def script_mark():
    return load_script("sdcpp_compare").RESULT_MARK


SETTINGS = {"size": 128, "steps": 2, "cfg": 7.5, "threads": 1, "seed": 0}
DRIVER_RESULT = {"load_s": 3.0, "image_s": 20.0, "peak_rss_gb": 2.5, "after_imports_gb": 0.03, "progress": [],
                 "image_sha256": "0" * 64, "image_size": [128, 128], "version": "0.4.7", "system_info": "AVX2 = 1"}


def test_an_sdcpp_row_runs_the_driver_with_its_options_and_reads_its_log(script, tmp_path):
    exe = fake_python(tmp_path, LOG, DRIVER_RESULT)
    row = script.run_engine(script.parse_engine("sdcpp-q8_0-fa"), tmp_path / "m.safetensors", SETTINGS, exe)
    assert row["error"] is None
    assert row["unet_steps_s"] == SAMPLING_S and row["unet_step_s"] == SAMPLING_S / 2
    assert row["vae_decode_s"] == DECODE_S and row["text_encoding_s"] == TEXT_S
    assert row["load_s"] == 3.0 and row["image_s"] == 20.0 and row["peak_rss_gb"] == 2.5   # the driver's own clocks
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["options"]["wtype"] == "q8_0" and args["options"]["flash_attn"] is True
    assert args["options"]["vae_conv_direct"] is False
    assert (args["size"], args["steps"], args["cfg"], args["threads"]) == (128, 2, 7.5, 1)
    assert args["file"] == str(tmp_path / "m.safetensors") and args["prompt"] == script.PROMPT


def test_a_failing_or_silent_sdcpp_row_is_an_error_not_a_crash(script, tmp_path):
    crashed = script.run_engine(script.parse_engine("sdcpp"), tmp_path / "m", SETTINGS,
                                fake_python(tmp_path, "GGML_ASSERT failed\n", DRIVER_RESULT, rc=134))
    assert crashed["error"].startswith("exit 134") and "GGML_ASSERT" in crashed["error"]
    silent = script.run_engine(script.parse_engine("sdcpp"), tmp_path / "m", SETTINGS,
                               fake_python(tmp_path, "no timings logged\n", DRIVER_RESULT))
    assert silent["error"].startswith("no text_encoding_s, unet_steps_s, vae_decode_s in sd.cpp's log")


def row(engine, kind, image_s, error=None):
    return {"engine": engine, "kind": kind, "options": {}, "timing": "", "error": error, "wall_s": 10.0,
            "load_s": 1.0, "text_encoding_s": 0.5, "unet_steps_s": image_s - 1.5, "unet_step_s": (image_s - 1.5) / 3,
            "vae_decode_s": 1.0, "image_s": image_s, "peak_rss_gb": 2.0}


REPORT = {"settings": {"size": 512, "steps": 3, "cfg": 7.5, "threads": 2, "seed": 0}, "cpu": "AMD EPYC",
          "cpu_flags": ["avx", "avx2", "fma", "f16c"], "file_gb": 2.13,
          "rows": [row("marble", "marble", 60.0), row("diffusers", "diffusers", 54.0), row("sdcpp", "sdcpp", 168.0),
                   row("sdcpp-q8_0", "sdcpp", 120.0), row("sdcpp-f16-direct", "sdcpp", 0, error="exit 1: bad")]}


def test_the_table_has_a_line_per_engine_and_names_the_fastest(script):
    table = script.markdown(REPORT)
    lines = table.splitlines()
    assert "512×512, Euler 3 steps" in lines[0] and "2 threads" in lines[0]
    assert lines[1] == "CPU: AMD EPYC; flags: avx avx2 fma f16c"
    assert "| marble | 1.0 | 0.50 | 19.50 | 1.00 | 60.00 | 2.000 | 1.00 |" in lines
    assert "| sdcpp-q8_0 | 1.0 | 0.50 | 39.50 | 1.00 | 120.00 | 2.000 | 2.00 |" in lines
    assert any(ln.startswith("| sdcpp-f16-direct | failed: exit 1: bad") for ln in lines)
    assert "Fastest sd.cpp: sdcpp-q8_0 120.00 s an image; fastest marble: marble 60.00 s, 0.50× (faster)." in lines


def test_the_json_is_written_once_and_never_over_a_file(script, tmp_path):
    out = tmp_path / "r.json"
    script.write_json(out, REPORT)
    assert json.loads(out.read_text()) == REPORT
    with pytest.raises(FileExistsError):
        script.write_json(out, {"other": 1})
    assert json.loads(out.read_text()) == REPORT


@pytest.mark.parametrize("args, message", [
    (["--engines", "marble,comfy"], "--engines: unknown engine 'comfy'"),
    (["--engines", "sdcpp-q9"], "--engines: engine 'sdcpp-q9'"),
    (["--size", "100"], "--size must be a positive multiple of 64"),
    (["--engines", "sdcpp", "--sdcpp-python", "/nonexistent/python"], "no sd.cpp python at /nonexistent/python"),
])
def test_bad_input_is_one_line_and_exit_2(script, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        script.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_an_existing_json_is_refused_before_any_work(script, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("keep")
    with pytest.raises(SystemExit) as exc:
        script.main(["--engines", "marble", "--json", str(out)])
    assert exc.value.code == 2 and out.read_text() == "keep"
    assert capsys.readouterr().err == f"{out} exists; nothing is overwritten\n"


@pytest.mark.slow
def test_marble_and_diffusers_rows_end_to_end_on_a_tiny_sd_file(script, tmp_path, capsys, monkeypatch):
    """The script's own path for marble and diffusers (no sd.cpp): the file written once, a fresh
    process per engine, phases that add up to the image, and the same pixels from marble's fp32 and
    fp16-storage loads of one fp16 file (fp16 values widened exactly either way)."""
    from marble.config import config_to_dict
    from sd_fixtures import tiny_sd
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(config_to_dict(tiny_sd("sd1"))))
    out = tmp_path / "report.json"
    script.main(["--config", str(config), "--engines", "marble,marble-fp16-lowmem,diffusers", "--size", "128",
                 "--steps", "2", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {r["engine"]: r for r in report["rows"]}
    assert list(rows) == ["marble", "marble-fp16-lowmem", "diffusers"]
    for r in rows.values():
        assert r["error"] is None and r["threads"] == 1
        assert r["image_s"] == pytest.approx(r["text_encoding_s"] + r["unet_steps_s"] + r["vae_decode_s"], rel=1e-9)
        assert r["unet_step_s"] == pytest.approx(r["unet_steps_s"] / 2) and r["vae_decode_s"] > 0
        assert r["peak_rss_gb"] > 0.1 and r["wall_s"] > r["load_s"] + r["image_s"]
    assert rows["marble"]["image_sha256"] == rows["marble-fp16-lowmem"]["image_sha256"]
    assert report["settings"]["model"] == "custom" and report["fastest_sdcpp"] is None
    assert sum(ln.startswith(("| marble", "| diffusers")) for ln in table.splitlines()) == 3
