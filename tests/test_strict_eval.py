"""The strict verdict (marble/eval/strict.py) beside GenEval's: hand-made detections where GenEval's
rules pass and the strict ones must fail, the cases both pass, and the benchmark and CLI report it."""
import json

import pytest
from typer.testing import CliRunner

from marble.eval import baselines
from marble.eval.benchmark import markdown_table, run_benchmark
from marble.eval.detector import Detection
from marble.eval.prompts import CATEGORIES, Need, Requirement, build_prompts, scale_counts
from marble.eval.strict import judge_strict
from marble.eval.verdict import judge


def det(color, shape, cx, cy, s=12.0):
    return Detection(color, shape, "small", (cx, cy), (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), 0.9)


def R(category, *objects, relation=None):
    return Requirement(category, tuple(Need(*o) for o in objects), relation)


def lenient_only(requirement, found):
    """GenEval's rules pass, the strict ones fail; the strict reason is returned."""
    assert judge(requirement, found)[0]
    ok, reason = judge_strict(requirement, found)
    assert not ok and reason
    return reason


def both(requirement, found):
    assert judge(requirement, found)[0] and judge_strict(requirement, found) == (True, "")


def test_swapped_colours_in_two_objects_fail_strict():
    two = R("two_objects", ("circle", "pink"), ("diamond", "blue"))
    reason = lenient_only(two, [det("blue", "circle", 15, 30), det("pink", "diamond", 45, 30)])
    assert "0 pink circle (expected 1)" in reason and "0 blue diamond (expected 1)" in reason
    assert "extra blue circle, pink diamond" in reason
    both(two, [det("pink", "circle", 15, 30), det("blue", "diamond", 45, 30)])


def test_extra_objects_fail_strict_in_every_category():
    extra = det("green", "star", 50, 50)
    cases = [
        (R("single_object", ("circle", "red")), [det("red", "circle", 15, 15)]),
        (R("two_objects", ("circle", "red"), ("square", "blue")), [det("red", "circle", 15, 15), det("blue", "square", 30, 15)]),
        (R("counting", ("square", "orange", 2)), [det("orange", "square", 15, 15), det("orange", "square", 30, 15)]),
        (R("colors", ("circle", "yellow")), [det("yellow", "circle", 15, 15)]),
        (R("color_attr", ("circle", "red"), ("square", "blue")), [det("red", "circle", 15, 15), det("blue", "square", 30, 15)]),
        (R("position", ("circle", "red"), ("square", "blue"), relation="left of"),
         [det("red", "circle", 10, 15), det("blue", "square", 40, 15)]),
    ]
    assert {c[0].category for c in cases} == set(CATEGORIES)
    for requirement, found in cases:
        both(requirement, found)
        assert lenient_only(requirement, found + [extra]) == "extra green star"


def test_a_second_object_of_the_named_shape_fails_strict():
    # single object: "at least one"; strict: exactly one
    assert "2 red circle (expected 1)" in lenient_only(R("single_object", ("circle", "red")),
                                                       [det("red", "circle", 15, 15), det("red", "circle", 45, 15)])
    # colour attribution: both pairs present, plus the swapped binding of one of them
    lenient_only(R("color_attr", ("circle", "red"), ("square", "blue")),
                 [det("red", "circle", 10, 10), det("blue", "square", 40, 10), det("red", "square", 40, 45)])


def test_counting_needs_the_colour_and_nothing_else():
    count = R("counting", ("star", "green", 3))
    three = [det("green", "star", 10 + 15 * i, 20) for i in range(3)]
    both(count, three)
    wrong = [det("green", "star", 10, 20), det("green", "star", 25, 20), det("red", "star", 40, 20)]
    assert "2 green star (expected 3)" in lenient_only(count, wrong) and "extra red star" in judge_strict(count, wrong)[1]
    assert not judge_strict(count, three[:2])[0] and not judge(count, three[:2])[0]


def test_uncoloured_need_takes_any_colour():
    both(R("single_object", ("circle",)), [det("blue", "circle", 20, 20)])
    assert not judge_strict(R("single_object", ("circle",)), [det("blue", "circle", 20, 20), det("red", "circle", 40, 40)])[0]


def test_position_with_a_wrong_colour_partner_fails_strict():
    left = R("position", ("circle", "red"), ("square", "blue"), relation="left of")
    # GenEval falls back to any square when none has the prompt's colour
    reason = lenient_only(left, [det("red", "circle", 10, 30), det("green", "square", 40, 30)])
    assert "0 blue square (expected 1)" in reason and "extra green square" in reason
    # GenEval judges only the prompt-coloured circle; strict refuses the second circle
    lenient_only(left, [det("red", "circle", 10, 30), det("green", "circle", 55, 30), det("blue", "square", 40, 30)])


def test_position_on_a_diagonal_fails_strict():
    left = R("position", ("circle", "red"), ("square", "blue"), relation="left of")
    diagonal = [det("red", "circle", 10, 10), det("blue", "square", 40, 40)]    # 45 degrees: left of and above
    assert "above and left of" in lenient_only(left, diagonal) and "expected only left of" in judge_strict(left, diagonal)[1]
    both(left, [det("red", "circle", 10, 25), det("blue", "square", 45, 33)])  # mostly horizontal: only left of
    assert not judge_strict(left, [det("red", "circle", 40, 30), det("blue", "square", 10, 30)])[0]
    below = R("position", ("star", "red"), ("cross", "blue"), relation="below")
    both(below, [det("red", "star", 30, 50), det("blue", "cross", 30, 10)])
    assert not judge_strict(below, [det("red", "star", 30, 10), det("blue", "cross", 30, 50)])[0]


@pytest.mark.parametrize("split", ["seen", "heldout", "concept", "concept-new"])
def test_groundtruth_passes_strict_and_noise_fails(split):
    prompts = build_prompts(split, scale_counts(36))
    truth = run_benchmark(baselines.groundtruth(prompts), prompts, [0, 1])
    assert truth.overall("strict_accuracy") == 1.0
    assert run_benchmark(baselines.noise(), prompts, [0, 1]).overall("strict_accuracy") <= 0.05


def test_benchmark_reports_strict_beside_geneval(monkeypatch):
    """Truth on even seeds; on odd seeds the truth with one extra detection: GenEval passes every
    image (extras are allowed; a heart is named by no base prompt), the strict verdict exactly half."""
    from marble.eval import benchmark
    prompts = build_prompts("seen", scale_counts(12))
    truth, real = baselines.groundtruth(prompts), benchmark.detect

    def tagged(prompt, seed):
        image = truth(prompt, seed - seed % 2).copy()
        image.info["extra"] = bool(seed % 2)
        return image

    monkeypatch.setattr(benchmark, "detect",
                        lambda image: real(image) + ([det("black", "heart", 60, 60)] if image.info["extra"] else []))
    result = run_benchmark(tagged, prompts, [0, 1])
    cats = result.per_category()
    assert result.overall() == 1.0 and result.overall("strict_accuracy") == 0.5
    assert all(c["strict_passed"] * 2 == c["images"] and c["strict_accuracy"] == 0.5 for c in cats.values())
    d = result.to_dict()
    assert d["overall"] == 1.0 and d["overall_strict"] == 0.5
    first = d["prompts"][0]["images"]
    assert first[0]["strict_pass"] is True and first[0]["strict_reason"] == ""
    assert first[1]["strict_pass"] is False and first[1]["strict_reason"] == "extra black heart" and first[1]["pass"]
    table = markdown_table(result)
    assert "| **overall** | **1.000** | **0.500** |" in table and "| category | accuracy | strict |" in table


@pytest.fixture
def cli_app():
    from marble.cli.app import app
    import marble.cli.eval  # noqa: F401  (registers the command)
    return app


def test_eval_command_reports_strict(cli_app, tmp_path):
    out = tmp_path / "gt.json"
    r = CliRunner().invoke(cli_app, ["eval", "--model", "groundtruth", "--split", "heldout", "--prompts", "12",
                                     "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["overall_strict"] == 1.0 and all(c["strict_accuracy"] == 1.0 for c in report["categories"].values())
    assert "| **overall** | **1.000** | **1.000** |" in r.stdout
