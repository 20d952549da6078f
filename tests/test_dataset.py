"""Image-folder data sets: `marble dataset export` and the loader, round trip and bad input."""
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from marble.data.image_folder import ImageFolder, write_image_folder
from marble.data.scene import Scene
from marble.data.shapes import sample

runner = CliRunner()


pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cli_app():
    from marble.cli.app import app
    import marble.cli.dataset  # noqa: F401  (registers the command group)
    return app


def export(app, *args):
    return runner.invoke(app, ["dataset", "export", *map(str, args)])


def test_export_and_load_round_trip(cli_app, tmp_path):
    out = tmp_path / "shapes"
    r = export(cli_app, "--world", "shapes", "--n", 6, "--out", out, "--split", "heldout", "--seed", 2)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(6)] + ["metadata.jsonl"]
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"{i:05d}.png" for i in range(6)]
    folder = ImageFolder(out)
    assert len(folder) == 6
    for i in range(6):
        image, text, record = folder[i]
        ref_image, ref_text, ref_scene = sample("heldout", 2, i)
        assert np.array_equal(np.asarray(image), np.asarray(ref_image))       # PNG is lossless
        assert text == ref_text == lines[i]["text"]
        assert Scene.from_dict(record["scene"]) == ref_scene
        assert record["split"] == "heldout" and record["seed"] == 2 and record["index"] == i
    pixels, text, _ = folder.pixels(0)
    assert pixels.shape == (3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    assert np.allclose(pixels.permute(1, 2, 0).numpy(), np.asarray(folder[0][0]) / 127.5 - 1, atol=1e-6)


def test_export_refuses_bad_input_and_existing_folders(cli_app, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    for args, message in [
        (["--world", "cubes", "--n", 2, "--out", tmp_path / "a"], "--world must be one of shapes"),
        (["--n", 0, "--out", tmp_path / "a"], "--n must be >= 1"),
        (["--n", 2, "--out", tmp_path / "a", "--split", "test"], "--split must be one of train, heldout"),
        (["--n", 2, "--out", tmp_path / "a", "--size", 8], "--size must be in 16..1024"),
        (["--n", 2, "--out", taken], "already exists"),
    ]:
        r = export(cli_app, *args)
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "a").exists() and [p.name for p in taken.iterdir()] == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(cli_app, "--n", 1, "--out", empty, "--size", 32).exit_code == 0
    assert Image.open(empty / "00000.png").size == (32, 32)


def test_write_is_all_or_nothing(tmp_path):
    def items():
        yield Image.new("RGB", (8, 8)), "one", {}
        raise RuntimeError("the source failed")
    with pytest.raises(RuntimeError):
        write_image_folder(tmp_path / "out", items())
    assert list(tmp_path.iterdir()) == []       # neither the folder nor its temporary sibling


def make_user_folder(root, lines, images=("a.jpg", "b.png")):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in images:
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / name)
    (root / "metadata.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return root


def test_a_users_own_captioned_photos(tmp_path):
    root = make_user_folder(tmp_path / "photos", [
        {"file_name": "a.jpg", "text": "my cat", "author": "me"},
        "",
        {"file_name": "b.png", "text": "my dog", "tags": ["pet"]}])
    folder = ImageFolder(root, size=16)
    image, text, record = folder[1]
    assert len(folder) == 2 and text == "my dog" and record["tags"] == ["pet"] and record["file_name"] == "b.png"
    assert image.size == (16, 16) and image.mode == "RGB"
    assert folder[0][2]["author"] == "me"
    assert ImageFolder(root)[0][0].size == (40, 30)


@pytest.mark.parametrize("lines, error, message", [
    ([{"file_name": "a.jpg", "text": "x"}, "{not json"], ValueError, "line 2: not valid JSON"),
    ([{"text": "x"}], ValueError, "line 1: needs a file_name"),
    ([{"file_name": "a.jpg", "text": 3}], ValueError, "text must be a string"),
    ([{"file_name": "gone.png", "text": "x"}], FileNotFoundError, "no image file"),
    ([{"file_name": "../a.jpg", "text": "x"}], ValueError, "must stay inside the folder"),
    ([["a list"]], ValueError, "expected a JSON object"),
    ([""], ValueError, "lists no images"),
])
def test_bad_folders_give_one_clear_error(tmp_path, lines, error, message):
    root = make_user_folder(tmp_path / "f", lines)
    with pytest.raises(error, match=message):
        ImageFolder(root)


def test_missing_folder_metadata_and_unreadable_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image folder"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl"):
        ImageFolder(tmp_path / "bare")
    root = make_user_folder(tmp_path / "f", [{"file_name": "fake.png", "text": "x"}], images=())
    (root / "fake.png").write_bytes(b"not a png")
    folder = ImageFolder(root)
    with pytest.raises(ValueError, match="is not a readable image"):
        folder[0]


def test_export_the_concept_training_folder(cli_app, tmp_path):
    """The small folder a LoRA learns the heart from: 48 images of the concept split, every one
    with a heart and none with a combination the split holds back."""
    from marble.data.concept import is_new
    out = tmp_path / "hearts"
    r = export(cli_app, "--split", "concept", "--n", 48, "--out", out)
    assert r.exit_code == 0, r.output
    folder = ImageFolder(out)
    assert len(folder) == 48 and len(list(out.glob("*.png"))) == 48
    for i in range(48):
        image, text, record = folder[i]
        ref_image, ref_text, ref_scene = sample("concept", 0, i)
        assert np.array_equal(np.asarray(image), np.asarray(ref_image)) and text == ref_text
        scene = Scene.from_dict(record["scene"])
        assert scene == ref_scene and record["split"] == "concept" and record["index"] == i
        objects = [(o.color, o.shape) for o in scene.objects]
        assert ("heart" in [s for _, s in objects]) and not is_new(objects)
    assert sum("heart" in folder[i][1] for i in range(48)) >= 40     # a few captions are generic
    r = export(cli_app, "--split", "concept-old", "--n", 4, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "concept, concept-new" in r.output and not (tmp_path / "x").exists()
