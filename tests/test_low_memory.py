"""`--low-memory` (tensor_file.map_tensors and release): weights that are read-only views of the
model file's memory map, whose pages the pipeline hands back between stages. The oracles: the
pixels equal those of the same file read into RAM, call after call; the bytes the kernel maps
back are the file's; VmRSS drops by the bytes released; bad files are refused as before."""
import numpy as np
import pytest
import torch

from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.marble_format import write_marble
from marble.checkpoints.resolve import load_model, random_model
from marble.checkpoints.sd_single_file import write_single_file
from marble.errors import ModelLoadError
from marble.fileio import write_new
from marble.pipeline import Pipeline, release_weights
from marble.request import GenerationRequest, resolve
from marble.tensor_file import map_tensors, read_header, release, safetensors_writer
from sd_fixtures import tiny_sdxl


def mapped_spans(path) -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of `path` (/proc/self/maps)."""
    spans = []
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def mapped_bytes(module, path) -> tuple[int, int]:
    """(bytes of `module`'s weights that lie in a mapping of `path`, bytes of all its weights)."""
    spans = mapped_spans(path)
    inside = total = 0
    for p in module.parameters():
        n = p.numel() * p.element_size()
        total += n
        inside += n * any(a <= p.data_ptr() < b for a, b in spans)
    return inside, total


def vm_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def images(pipe: Pipeline, n: int = 2) -> list[np.ndarray]:
    request = GenerationRequest(prompt="a red cat", negative_prompt="blurry", seed=3, steps=3, sampler="Euler",
                                width=32, height=32, n=n)
    return [np.asarray(im) for im in pipe.generate(resolve(request, pipe.defaults)).images]


@pytest.mark.parametrize("writer", [write_marble, write_single_file], ids=["marble", "sd-single-file"])
def test_mapped_fp16_weights_give_the_same_pixels_call_after_call(tmp_path, writer, monkeypatch):
    """An fp16 file loaded into fp16 storage: the weights are views of the file (in an SD single
    file all but the few the reader transposes), every stage's pages are released between calls
    (n=2, then a second request), and each image equals the in-RAM model's."""
    path = writer(from_model(random_model(tiny_sdxl, seed=5), dtype=torch.float16), tmp_path / "xl.safetensors")
    in_ram = load_model(str(path), storage=torch.float16)
    mapped = load_model(str(path), storage=torch.float16, mapped=True)
    assert mapped_bytes(in_ram.model, path)[0] == 0
    for net in (mapped.model.unet, mapped.model.text_encoder, mapped.model.vae):
        inside, total = mapped_bytes(net, path)
        assert inside == total or writer is write_single_file and inside > 0.99 * total, (inside, total)
    assert {p.dtype for p in mapped.model.parameters()} == {torch.float16} and mapped.model.dtype == torch.float32
    released = []   # the pipeline's releases, in bytes: they really happen, per image
    monkeypatch.setattr("marble.pipeline.release", lambda tensors: released.append(release(tensors)) or released[-1])
    want = images(Pipeline(in_ram), n=2)
    assert released == []   # nothing mapped: the pipeline does not even look (no work per image)
    released.clear()
    pipe = Pipeline(mapped)
    assert all(np.array_equal(a, b) for a, b in zip(images(pipe, n=2), want))
    unet_bytes = mapped_bytes(mapped.model.unet, path)[0]
    # per request: the text encoders (+ VAE) once, then per image the U-Net before its decode and the VAE after
    assert len(released) == 1 + 2 * 2 and released[1] >= unet_bytes and released[3] >= unet_bytes, released
    assert np.array_equal(images(pipe, n=1)[0], want[0])
    assert release([p for p in mapped.model.unet.parameters()]) >= 0.99 * mapped_bytes(mapped.model.unet, path)[0]
    assert all(np.array_equal(a, b) for a, b in zip(images(pipe, n=2), want))


def test_tensors_that_need_a_cast_are_read_not_mapped(tmp_path):
    """A float32 file into fp16 storage casts every tensor: nothing maps, the model is the one read
    into RAM, and releasing it is a no-op that leaves every value in place."""
    path = write_marble(from_model(random_model(tiny_sdxl, seed=6)), tmp_path / "f32.safetensors")
    loaded = load_model(str(path), storage=torch.float16, mapped=True)
    assert mapped_bytes(loaded.model, path)[0] == 0
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    release_weights(loaded.model.unet, loaded.model.vae, loaded.model.text_encoder)
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())


def test_a_single_files_fused_attention_projections_stay_mapped(tmp_path):
    """OpenCLIP stores q, k and v as one in_proj per layer; the loader splits it into three row
    blocks, which must be views of the mapping, not copies: a copy is anonymous memory that no
    release frees, and it pins the file pages it was read from (0.32 GB for SDXL's bigG). Only the
    text projection, stored transposed, is a copy."""
    path = write_single_file(from_model(random_model(tiny_sdxl, seed=6), dtype=torch.float16),
                             tmp_path / "sdxl.safetensors")
    tower = load_model(str(path), storage=torch.float16, mapped=True).model.text_encoder.encoders[1]
    spans = mapped_spans(path)
    copies = [name for name, p in tower.named_parameters()
              if not any(a <= p.data_ptr() < b for a, b in spans)]
    assert copies == ["text_projection.weight"]


def test_release_hands_the_mapped_pages_back(tmp_path):
    """64 MB of fp16 weights, mapped and read once: VmRSS grows by their bytes; after release it
    falls by at least 90% of them (the rest: other allocations of the process in between), and the
    values read again are the file's."""
    g = torch.Generator().manual_seed(0)
    weights = {f"w{i}": torch.randn(1024, 4096, generator=g).to(torch.float16) for i in range(8)}
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    path = tmp_path / "w.safetensors"
    with open(path, "wb") as f:
        safetensors_writer(weights)(f)
    net = torch.nn.ParameterDict({k: torch.nn.Parameter(t, requires_grad=False)
                                  for k, t in map_tensors(read_header(path), dtype=torch.float16)})
    assert mapped_bytes(net, path) == (nbytes, nbytes)
    sums = torch.zeros(len(net), dtype=torch.float64)
    base = vm_rss()
    for i, p in enumerate(net.values()):   # every page touched; float64 sums leave no big temporaries
        sums[i] = p.sum(dtype=torch.float64)
    touched = vm_rss()
    assert touched - base >= 0.95 * nbytes, (touched - base, nbytes)
    assert release(net.values()) >= nbytes
    released = vm_rss()
    assert touched - released >= 0.9 * nbytes, (touched - released, nbytes)
    assert all(torch.equal(net[k], weights[k]) for k in weights)   # re-faulted: the file's bytes


def test_a_truncated_or_corrupt_file_is_refused_in_one_line(tmp_path):
    """The header is checked against the file's size before anything is mapped: one line, exit 2."""
    from typer.testing import CliRunner

    from marble.cli import app
    path = write_marble(from_model(random_model(tiny_sdxl, seed=7), dtype=torch.float16), tmp_path / "m.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(str(cut), storage=torch.float16, mapped=True)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    with pytest.raises(ModelLoadError, match="bad header length"):
        load_model(str(bad), storage=torch.float16, mapped=True)
    result = CliRunner().invoke(app, ["generate", "a cat", "--model", str(cut), "--weights", "fp16", "--low-memory",
                                      "--steps", "1", "--size", "32x32", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "truncated or corrupt" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_generate_low_memory_writes_the_same_png_and_records_nothing(tmp_path):
    """`marble generate --low-memory`: the same pixels and the same record (nothing in it says how
    the weights were held: it cannot change the image)."""
    from PIL import Image
    from typer.testing import CliRunner

    from marble.cli import app
    from marble.png import read_record
    path = write_marble(from_model(random_model(tiny_sdxl, seed=8), dtype=torch.float16), tmp_path / "m.safetensors")
    pngs = []
    for flag in ([], ["--low-memory"]):
        out = tmp_path / f"out{len(pngs)}"
        result = CliRunner().invoke(app, ["generate", "a red cat", "--model", str(path), "--weights", "fp16", "--seed", "2",
                                          "--steps", "2", "--sampler", "Euler", "--size", "32x32", "--out", str(out), *flag])
        assert result.exit_code == 0, result.output
        (png,) = out.glob("*.png")
        pngs.append(png)
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in pngs)
    assert np.array_equal(a, b)
    assert read_record(pngs[0]) == read_record(pngs[1])
    assert "--low-memory" not in result.output   # everything mapped: no warning
    result = CliRunner().invoke(app, ["generate", "a red cat", "--model", str(path), "--steps", "1", "--size", "32x32",
                                      "--out", str(tmp_path / "f32"), "--low-memory"])
    assert result.exit_code == 0 and "--low-memory: none of m's weights are mapped" in result.output, result.output


def test_a_mapped_base_and_refiner_give_the_same_pixels(tmp_path):
    """Base and refiner both file-backed: both text encoders released before sampling, both U-Nets
    before the decode; the images equal those of the two models read into RAM."""
    paths = [write_marble(from_model(random_model(lambda r=r: tiny_sdxl(r), seed=9), dtype=torch.float16),
                          tmp_path / f"{name}.safetensors") for r, name in ((False, "base"), (True, "refiner"))]
    results = []
    for mapped in (False, True):
        base, refiner = (load_model(str(p), storage=torch.float16, mapped=mapped) for p in paths)
        inside, total = mapped_bytes(refiner.model, paths[1])
        assert inside == (total if mapped else 0)
        results.append(images(Pipeline(base, refiner=refiner, refiner_switch=0.5), n=2))
    assert all(np.array_equal(a, b) for a, b in zip(*results))


def test_a_filled_writer_streams_the_same_bytes_and_refuses_a_mismatch(tmp_path):
    """safetensors_writer(..., fill) declared by meta tensors (how benchmarks/sd15_memory.py streams
    a 6.9 GB file): the file is byte for byte the one written from the tensors, each value asked for
    once, in key order (none for an empty tensor); a filled tensor of another dtype or shape than
    declared stops the write and leaves nothing behind."""
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=g).half(), "a": torch.randn(7, generator=g), "e": torch.empty(0, 4)}
    declared = {k: v.to("meta") for k, v in tensors.items()}
    asked = []

    def fill(name):
        asked.append(name)
        return tensors[name].clone()
    whole = write_new(tmp_path / "whole.safetensors", safetensors_writer(tensors, {"k": "v"}))
    streamed = write_new(tmp_path / "streamed.safetensors", safetensors_writer(declared, {"k": "v"}, fill))
    assert streamed.read_bytes() == whole.read_bytes() and asked == ["a", "b"]
    for wrong in (lambda name: tensors[name].float(), lambda name: tensors[name].reshape(-1)):
        with pytest.raises(ValueError, match="b: filled as"):
            write_new(tmp_path / "bad.safetensors", safetensors_writer(declared, None, wrong))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["streamed.safetensors", "whole.safetensors"]
