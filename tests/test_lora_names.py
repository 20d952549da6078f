"""LoRA by name: A1111's prompt tags, the LoRA folder (and its refusals), the CLI's PATH[:WEIGHT]."""
import os

import pytest
import torch

from marble.adapters.lora_files import LoraError
from marble.adapters.lora_folder import default_lora_dir, list_loras, parse_lora_arg, resolve_lora
from marble.adapters.lora_tags import LoraTag, LoraTagError, split_lora_tags
from marble.tensor_file import safetensors_writer
from marble.fileio import write_new


@pytest.mark.parametrize("prompt, text, tags", [
    ("a cat", "a cat", []),
    ("a cat <lora:ink:0.8>", "a cat ", [LoraTag("ink", 0.8, 0.8)]),
    ("<lora:ink>a cat", "a cat", [LoraTag("ink", 1.0, 1.0)]),
    ("a <LORA:ink:0.5:1.2> cat, <lora:sub/oil:-1>", "a  cat, ", [LoraTag("ink", 0.5, 1.2), LoraTag("sub/oil", -1, -1)]),
    ("x <lora:ink:unet=0.3>", "x ", [LoraTag("ink", 1.0, 0.3)]),
    ("x <lora:ink:0.7:te=0.2>", "x ", [LoraTag("ink", 0.2, 0.7)]),
    ("x <hypernet:h:1> <lora: ink : 2 >", "x <hypernet:h:1> ", [LoraTag("ink", 2.0, 2.0)]),
])
def test_tags_are_cut_out_and_parsed_as_a1111_does(prompt, text, tags):
    assert split_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize("prompt, match", [
    ("<lora:ink:strong>", "'strong' is not a number"),
    ("<lora::1>", "has no name"),
    ("<lora:ink:1:2:3>", "more than two"),
    ("<lora:ink:dyn=3>", "unknown argument 'dyn'"),
    ("<lora:ink:nan>", "not a finite number"),
])
def test_bad_tags_fail_with_one_line(prompt, match):
    with pytest.raises(LoraTagError, match=match) as info:
        split_lora_tags(prompt)
    assert "\n" not in str(info.value)


def lora_file(path, metadata=None):
    write_new(path, safetensors_writer({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, metadata))
    return path


def test_names_resolve_only_inside_the_folder(tmp_path):
    folder = tmp_path / "lora"
    (folder / "styles").mkdir(parents=True)
    ink = lora_file(folder / "ink.safetensors", {"ss_output_name": "inky"})
    oil = lora_file(folder / "styles" / "oil.safetensors")
    secret = lora_file(tmp_path / "secret.safetensors")
    os.symlink(secret, folder / "escape.safetensors")
    os.symlink(ink, folder / "alias.safetensors")            # a link inside the folder is fine
    assert resolve_lora("ink", folder) == ink.resolve()
    assert resolve_lora("ink.safetensors", folder) == ink.resolve()
    assert resolve_lora("styles/oil", folder) == oil.resolve()
    assert resolve_lora("alias", folder) == ink.resolve()
    for name, match in [("../secret", "not a path out of it"), (str(secret), "not a path out of it"),
                        ("styles/../../secret", "not a path out of it"), ("escape", "link out of the LoRA folder"),
                        ("nothing", "no LoRA named 'nothing'"), ("", "empty"), ("..\\secret", "not a path")]:
        with pytest.raises(LoraError, match=match):
            resolve_lora(name, folder)
    (folder / "broken.safetensors").write_bytes(b"not a tensor file")
    listed = list_loras(folder)
    assert [e["name"] for e in listed] == ["alias", "ink", "styles/oil"]
    assert listed[1] == {"name": "ink", "alias": "inky", "path": str(ink.resolve()),
                         "metadata": {"ss_output_name": "inky"}}
    assert listed[2]["alias"] == "styles/oil"
    assert list_loras(tmp_path / "absent") == []


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MARBLE_LORA_DIR", str(tmp_path))
    assert default_lora_dir() == tmp_path
    monkeypatch.delenv("MARBLE_LORA_DIR")
    monkeypatch.setenv("MARBLE_MODELS", str(tmp_path / "m"))
    assert default_lora_dir() == tmp_path / "m" / "lora"


def test_cli_lora_argument():
    assert parse_lora_arg("ink.safetensors") == ("ink.safetensors", 1.0)
    assert parse_lora_arg("dir/ink.safetensors:0.6") == ("dir/ink.safetensors", 0.6)
    assert parse_lora_arg("C:/loras/ink.safetensors") == ("C:/loras/ink.safetensors", 1.0)
    with pytest.raises(LoraError, match="'heavy' is not a number"):
        parse_lora_arg("ink.safetensors:heavy")


def test_loader_reads_each_file_once_and_keeps_names_inside_the_folder(tmp_path):
    from marble.adapters.lora import LoraUse
    from marble.adapters.lora_files import Lora, LoraLayer, save_kohya
    from marble.adapters.lora_loader import LoraLoader, LoraSpec, lora_hashes, record_entries
    from marble.adapters.lora_table import module_table
    from marble.checkpoints.resolve import random_model
    model = random_model()
    table = module_table(model)
    target = table.select(["attention"])[0]
    w = target.module.weight
    up_shape = (w.shape[0], 2, 1, 1) if w.ndim == 4 else (w.shape[0], 2)
    layer = LoraLayer(torch.ones(2, *w.shape[1:]), torch.ones(up_shape), 1.0)
    folder = tmp_path / "lora"
    path = save_kohya(folder / "ink.safetensors", Lora("ink", {target.name: layer}), table)
    loader = LoraLoader(model, folder)
    first = loader.read(LoraSpec("ink", 0.5, 0.7))
    assert loader.read(LoraSpec("ink.safetensors")) is first                     # cached
    assert loader.read(LoraSpec(str(path), is_path=True)) is first              # same file by path
    with pytest.raises(LoraError, match="not a path out of it"):
        loader.read(LoraSpec(str(path)))                                         # a tag never takes a path
    with pytest.raises(LoraError, match="no such file"):
        loader.read(LoraSpec(str(tmp_path / "none.safetensors"), is_path=True))
    path.unlink()
    save_kohya(path, Lora("ink", {target.name: LoraLayer(layer.down * 2, layer.up, 1.0)}), table)
    second = loader.read(LoraSpec("ink"))
    assert second is not first and torch.equal(second.layers[target.name].down, layer.down * 2)
    specs = [LoraSpec("ink", 0.5, 0.7), LoraSpec(str(path), 1.0, 1.0, is_path=True)]
    uses = loader.uses(specs)
    assert uses[0] == LoraUse(second, 0.5, 0.7)
    entries = record_entries(uses, specs)
    assert entries == [{"name": "ink", "hash": second.hash, "te": 0.5, "unet": 0.7},
                       {"name": "ink", "hash": second.hash, "te": 1.0, "unet": 1.0, "path": str(path)}]
    assert lora_hashes(entries) == f"ink: {second.hash}" and len(second.hash) == 12
