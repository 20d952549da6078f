"""`marble eval --control sketch` with the unit's settings (--control-weight, --control-mode,
--control-start, --control-end), --control-only and --categories, on tiny-random with a random
(non-zero) ControlNet, two prompts and one seed.

The oracle is exact: every image the eval generates is hashed (a spy on marble.cli.eval._run's
image source), so weight 0 must give the very images of the run without the ControlNet, and an
explicit weight 1, Balanced, 0..1 the very images of the default run."""
import hashlib
import json

import pytest
from typer.testing import CliRunner

from marble.cli import app
from marble.eval.prompts import CATEGORIES, build_prompts, pick_categories, scale_counts
from sd_fixtures import random_controlnet_file

runner = CliRunner()
SMALL = ["--model", "tiny-random", "--split", "heldout", "--prompts", "6", "--seeds", "1", "--steps", "2",
         "--threads", "1", "--categories", "position,color_attr"]


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    return random_controlnet_file(tmp_path_factory.mktemp("eval-cn") / "cn.safetensors", "marble")


@pytest.fixture
def images(monkeypatch):
    """(run label, prompt, seed) -> sha256 of the image's pixels, for every image an eval generates."""
    import marble.cli.eval as cli_eval
    seen: dict[tuple[str, str, int], str] = {}
    run = cli_eval._run

    def spy(generate, prompt_list, seed_list, split, keep_tiles):
        def hashed(prompt, seed):
            image = generate(prompt, seed)
            seen[(split, prompt, seed)] = hashlib.sha256(image.tobytes()).hexdigest()
            return image
        return run(hashed, prompt_list, seed_list, split, keep_tiles)

    monkeypatch.setattr(cli_eval, "_run", spy)
    return seen


def run_eval(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    r = runner.invoke(app, ["eval", *SMALL, *map(str, args), "--json", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def split_runs(seen: dict) -> tuple[dict, dict]:
    """The controlled run's hashes and the plain run's, each keyed by (prompt, seed)."""
    ctrl = {k[1:]: v for k, v in seen.items() if k[0].endswith("+ sketch")}
    plain = {k[1:]: v for k, v in seen.items() if not k[0].endswith("+ sketch")}
    return ctrl, plain


def test_weight_0_is_the_run_without_and_an_explicit_default_unit_is_the_default(controlnet, tmp_path, images):
    default = run_eval(tmp_path, "default", "--control", "sketch", "--control-model", controlnet)
    ctrl, plain = split_runs(images)
    assert len(ctrl) == len(plain) == 2 and ctrl.keys() == plain.keys()
    assert all(ctrl[k] != plain[k] for k in ctrl), "the ControlNet must change every image, or weight 0 proves nothing"
    assert default["control_settings"] == {"weight": 1.0, "mode": "Balanced", "start": 0.0, "end": 1.0,
                                           "resize": "Just Resize", "regions": 0.0}
    assert default["scenes_per"] == "prompt"
    assert {p["category"] for p in default["with_control"]["prompts"]} == {"position", "color_attr"}
    assert set(default["side_by_side"]) == {"position", "color_attr", "overall"}

    images.clear()
    explicit = run_eval(tmp_path, "explicit", "--control", "sketch", "--control-model", controlnet, "--control-weight",
                        "1", "--control-mode", "balanced", "--control-start", "0", "--control-end", "1",
                        "--control-only")
    assert split_runs(images) == (ctrl, {}), "--control-only runs nothing without the ControlNet"
    assert explicit["with_control"]["prompts"] == default["with_control"]["prompts"]
    assert explicit["without_control"] is None and explicit["side_by_side"]["overall"]["without"] is None

    images.clear()
    zero = run_eval(tmp_path, "zero", "--control", "sketch", "--control-model", controlnet, "--control-weight", "0")
    ctrl0, plain0 = split_runs(images)
    assert plain0 == plain and ctrl0 == plain
    assert zero["with_control"]["prompts"] == zero["without_control"]["prompts"] == default["without_control"]["prompts"]
    assert zero["control_settings"]["weight"] == 0.0


@pytest.mark.parametrize("mode, name", [("prompt", "My prompt is more important"), ("2", "ControlNet is more important"),
                                        ("Balanced", "Balanced")])
def test_the_json_records_the_unit_with_the_mode_by_its_canonical_name(controlnet, tmp_path, images, mode, name):
    report = run_eval(tmp_path, "r", "--control", "sketch", "--control-model", controlnet, "--control-weight", "1.5",
                      "--control-mode", mode, "--control-start", "0.25", "--control-end", "0.75", "--control-only",
                      "--regions", "0.5")
    assert report["control_settings"] == {"weight": 1.5, "mode": name, "start": 0.25, "end": 0.75,
                                          "resize": "Just Resize", "regions": 0.5}
    assert report["without_control"] is None and len(images) == 2


@pytest.mark.parametrize("args, message", [
    (["--control-mode", "louder"], "unknown control mode 'louder'"),
    (["--control-weight", "2.5"], "weight must be a number in [0, 2]"),
    (["--control-start", "0.6", "--control-end", "0.4"], "guidance start 0.6 must be below guidance end 0.4"),
    (["--control-end", "1.5"], "guidance end must be a number in [0, 1]"),
    (["--regions", "12"], "regions must be a number in [0, 10]"),
    (["--scenes", "seed"], "--scenes must be one of prompt, image, got 'seed'"),
])
def test_a_bad_unit_is_one_line_exit_2_before_any_image(controlnet, tmp_path, images, args, message):
    out = tmp_path / "out.json"
    r = runner.invoke(app, ["eval", *SMALL, "--control", "sketch", "--control-model", str(controlnet), *args,
                            "--json", str(out)])
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists() and not images


@pytest.mark.parametrize("args, message", [
    (["--control-weight", "1.5"], "--control-weight needs --control sketch"),
    (["--control-mode", "prompt"], "--control-mode needs --control sketch"),
    (["--control-start", "0.1", "--control-end", "0.9"], "--control-start needs --control sketch"),
    (["--control-only"], "--control-only needs --control sketch"),
    (["--regions", "0.5"], "--regions needs --control sketch"),
    (["--scenes", "image"], "--scenes needs --control sketch"),
    (["--categories", "position,colour_attr"],
     "--categories: unknown category 'colour_attr'; choose from " + ", ".join(CATEGORIES)),
    (["--categories", ","], "--categories: no category given"),
])
def test_unit_flags_without_control_and_unknown_categories_are_one_line_exit_2(tmp_path, images, args, message):
    out = tmp_path / "out.json"
    r = runner.invoke(app, ["eval", "--model", "tiny-random", "--steps", "2", *args, "--json", str(out)])
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists() and not images


def test_scenes_per_image_sketch_a_scene_of_its_own_for_every_seed():
    """--scenes image: image (text, seed) is steered by the sketch of truth_scene(requirement,
    1000 + seed); --scenes prompt: every seed by the prompt's one scene, truth_scene(requirement, 0)."""
    from marble.data.sketch import sketch
    from marble.eval.control import image_scenes, prompt_scenes, scene_keys, sketch_source
    from marble.eval.prompts import truth_scene
    prompts = build_prompts("heldout", {"counting": 4})
    seeds = [0, 1, 2]
    echo = lambda prompt, seed, image: image        # noqa: E731  (the control image each image gets)
    per_image = sketch_source(echo, image_scenes(prompts, seeds), 64, scene_keys("image"))
    per_prompt = sketch_source(echo, prompt_scenes(prompts), 64)
    for p in prompts:
        drawn = [per_image(p.text, s).tobytes() for s in seeds]
        assert drawn == [sketch(truth_scene(p.requirement, 1000 + s), 64).tobytes() for s in seeds]
        assert len(set(drawn)) == len(seeds), "every seed gets a layout of its own"
        once = sketch(truth_scene(p.requirement, 0), 64).tobytes()
        assert [per_prompt(p.text, s).tobytes() for s in seeds] == [once] * len(seeds)
        assert once not in drawn


def test_the_json_names_each_images_scene_with_scenes_image(controlnet, tmp_path, images):
    from marble.eval.control import image_scenes
    report = run_eval(tmp_path, "img", "--control", "sketch", "--control-model", controlnet, "--control-only",
                      "--scenes", "image")
    prompts = {p["prompt"]: p for p in report["with_control"]["prompts"]}
    assert report["scenes_per"] == "image" and len(images) == 2
    assert set(report["scenes"]) == {f"{text} #0" for text in prompts}
    subset = build_prompts("heldout", {c: n for c, n in scale_counts(6).items() if c in ("position", "color_attr")})
    expected = image_scenes(subset, [0], full=build_prompts("heldout", scale_counts(6)))
    assert report["scenes"] == {k: scene.to_dict() for k, scene in expected.items()}


@pytest.mark.parametrize("per", ["prompt", "image"])
def test_a_category_subset_sketches_each_text_as_the_full_run_does(per):
    """24 of the 34 held-out colour-attribution texts are two_objects texts too, whose requirement
    (and so truth scene) is two_objects'; the full run sketches them from that first prompt."""
    from marble.eval.control import image_key, image_scenes, prompt_scenes
    full = build_prompts("heldout", scale_counts(200))
    subset = [p for p in full if p.category == "color_attr"]
    scenes = (lambda ps, **kw: prompt_scenes(ps, **kw)) if per == "prompt" else \
        (lambda ps, **kw: image_scenes(ps, [0, 1], **kw))
    whole, alone, kept = scenes(full), scenes(subset), scenes(subset, full=full)
    assert kept.keys() == alone.keys() and kept == {k: whole[k] for k in kept}
    shared = {p.text for p in full if p.category == "two_objects"} & {p.text for p in subset}
    assert len(shared) == 24
    key = (lambda t: t) if per == "prompt" else (lambda t: image_key(t, 1))
    assert all(alone[key(t)] != whole[key(t)] for t in shared), "without the full run's order, shared texts move"
    assert all(alone[key(p.text)] == whole[key(p.text)] for p in subset if p.text not in shared)


@pytest.mark.parametrize("split", ["seen", "heldout"])
def test_a_category_subset_keeps_each_categorys_prompts_of_the_full_run(split):
    full = build_prompts(split, scale_counts(200))
    keep = pick_categories(" color_attr, position")
    assert keep == ("position", "color_attr")    # in the benchmark's order, whatever the order given
    subset = build_prompts(split, {c: n for c, n in scale_counts(200).items() if c in keep})
    assert [(p.text, p.requirement) for p in subset] == [(p.text, p.requirement) for p in full if p.category in keep]
    assert len(subset) == 68


def test_categories_without_control_scores_only_those(tmp_path):
    out = tmp_path / "gt.json"
    r = runner.invoke(app, ["eval", "--model", "groundtruth", "--split", "heldout", "--prompts", "200",
                            "--categories", "counting", "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    full = [p.text for p in build_prompts("heldout", scale_counts(200)) if p.category == "counting"]
    assert list(report["categories"]) == ["counting"] and report["categories"]["counting"]["accuracy"] == 1.0
    assert [p["prompt"] for p in report["prompts"]] == full and len(full) == 34


def test_the_sweep_runs_its_grid_and_weight_0_scores_as_the_run_without(controlnet, tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "controlnet_sweep.py"
    spec = importlib.util.spec_from_file_location("controlnet_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep"
    args = ["--out", str(out), "--model", "tiny-random", "--control-model", str(controlnet), "--weights", "0,1",
            "--modes", "balanced", "--categories", "color_attr,position", "--prompts", "6", "--seeds", "1",
            "--steps", "2", "--threads", "1"]
    sweep.main(args)
    assert sorted(p.name for p in out.iterdir()) == ["table.md", "w0-balanced.json", "w1-balanced.json",
                                                     "without.json"]
    without, zero, one = (json.loads((out / f"{n}.json").read_text()) for n in ("without", "w0-balanced",
                                                                                "w1-balanced"))
    assert zero["with_control"]["prompts"] == without["prompts"] and zero["without_control"] is None
    assert one["control_settings"]["weight"] == 1.0 and list(one["with_control"]["categories"]) == ["position",
                                                                                                   "color_attr"]
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0].startswith("| run | weight | mode | start–end | position (bar 0.95) | color_attr (bar 0.9) |")
    assert [line.split(" | ")[:3] for line in lines[2:]] == [["| without", "—", "no ControlNet"],
                                                              ["| w0-balanced", "0", "Balanced"],
                                                              ["| w1-balanced", "1", "Balanced"]]
    # weight 0's scores are the run without's, cell for cell (the seconds aside)
    assert lines[2].split(" | ")[4:-1] == lines[3].split(" | ")[4:-1]
    # a second call runs nothing (every JSON exists) and prints the same table
    capsys.readouterr()
    sweep.main(args)
    captured = capsys.readouterr()
    assert "0 of 3 evals to run" in captured.err and captured.out.strip() == "\n".join(lines)
