"""The generation record: A1111 infotext layout, JSON round trip, atomic never-overwriting PNG writes."""
import os
import threading

import pytest
from PIL import Image

from marble.png import png_bytes, read_record, save_numbered, write_atomic
from marble.record import GenerationRecord, parse_parameters

pytestmark = pytest.mark.unit

REC = GenerationRecord(prompt="two red circles, above: a blue square", negative_prompt="blurry", seed=42,
                       steps=20, sampler="Euler a", cfg=7.5, width=64, height=64, model_name="builtin",
                       model_hash="0123456789", marble_version="0.1.0")


def test_a1111_layout():
    text = REC.to_parameters()
    assert text.split("\n") == [
        "two red circles, above: a blue square",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x64, Model hash: 0123456789, "
        "Model: builtin, Version: marble 0.1.0",
    ]
    img2img = GenerationRecord(**{**REC.__dict__, "negative_prompt": "", "strength": 0.75, "cfg": 7.0})
    lines = img2img.to_parameters().split("\n")
    assert len(lines) == 2 and "CFG scale: 7," in lines[1] and "Denoising strength: 0.75" in lines[1]


def test_parse_parameters_round_trip():
    parsed = parse_parameters(REC.to_parameters())
    assert parsed["Prompt"] == REC.prompt and parsed["Negative prompt"] == "blurry"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "Euler a" and parsed["Seed"] == "42"
    assert parsed["Size"] == "64x64" and parsed["Model hash"] == "0123456789"


def test_json_round_trip_and_png_chunks(tmp_path):
    assert GenerationRecord.from_json(REC.to_json()) == REC
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), REC))
    assert read_record(path) == REC
    assert Image.open(path).info["parameters"] == REC.to_parameters()


def test_write_atomic_never_overwrites_and_leaves_no_temp(tmp_path):
    p = tmp_path / "x.png"
    write_atomic(p, b"one")
    with pytest.raises(FileExistsError):
        write_atomic(p, b"two")
    assert p.read_bytes() == b"one"
    assert os.listdir(tmp_path) == ["x.png"]


def test_concurrent_numbered_saves_never_collide(tmp_path):
    paths = []
    img = Image.new("RGB", (4, 4))

    def worker():
        for _ in range(5):
            paths.append(save_numbered(img, REC, tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 20 == len(list(tmp_path.glob("*.png")))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
