"""The shapes world: determinism by seed, truthful geometry and captions, and held-out compositions
that never reach the training split."""
import itertools
import re

import numpy as np
import pytest

from marble.data.captions import NUMBER_WORDS, RELATION_WORDS, SHAPE_SYNONYMS, plural
from marble.data.scene import INVERSE, Obj, Scene, canonical, relations
from marble.data.shapes import (BACKGROUNDS, COLORS, GAP, GEOMETRY, HELDOUT_PAIRS, HELDOUT_RELATIONS, MARGIN,
                                SEEN_PAIRS, SEEN_RELATIONS, SHAPES, SIZE_RANGES, ShapesDataset, forbidden_relation,
                                KIND_WEIGHTS, KINDS, kind_probabilities, render_dataset, sample, sample_scene)

N_TRAIN = 3000   # samples checked for the held-out guarantee (~1 s)


@pytest.fixture(scope="module")
def train_scenes():
    return [sample_scene("train", 0, i) for i in range(N_TRAIN)]


@pytest.fixture(scope="module")
def heldout_scenes():
    return [sample_scene("heldout", 0, i) for i in range(1000)]


def test_vocabulary_meets_the_issue():
    assert len(SHAPES) >= 5 and len(COLORS) >= 7 and len(BACKGROUNDS) >= 3
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    palette = np.array(list(COLORS.values()), float)
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)]
    to_bg = [np.linalg.norm(c - np.array(b)) for c in palette for b in BACKGROUNDS.values()]
    assert min(gaps) >= 90 and min(to_bg) >= 110   # separable by nearest palette entry


def test_same_seed_same_sample_other_seed_other_sample():
    a = [sample("train", 7, i) for i in range(5)]
    b = [sample("train", 7, i) for i in range(5)]
    for (ia, ta, sa), (ib, tb, sb) in zip(a, b):
        assert ia.tobytes() == ib.tobytes() and ta == tb and sa == sb
    c = [sample("train", 8, i) for i in range(5)]
    assert [t for _, t, _ in a] != [t for _, t, _ in c]
    # index i is independent of what else was drawn: a batch from `start` equals single samples
    images, captions = render_dataset(3, "train", 7, start=2)
    for k in range(3):
        assert images[k].tobytes() == a[2 + k][0].tobytes() and captions[k] == a[2 + k][1]


def test_golden_captions():
    """The world is pinned: numpy's PCG64 streams are stable across versions and platforms."""
    assert [sample_scene("train", 0, i)[1] for i in range(4)] == [
        "a small yellow square and a pink cross",
        "two orange circles on a white background",
        "a green diamond and a green square on a cream background",
        "a red cross placed over a purple square",
    ]


def test_a_kind_mix_draws_only_those_kinds_and_the_default_mix_is_the_world():
    assert kind_probabilities(None) == KIND_WEIGHTS
    # the world's own weights, named, give the same stream to the bit
    named = kind_probabilities(dict(zip(KINDS, KIND_WEIGHTS)))
    assert [sample_scene("train", 0, i, kinds=named)[1] for i in range(50)] == \
        [sample_scene("train", 0, i)[1] for i in range(50)]
    only = kind_probabilities({"relation": 3})
    assert only == (0.0, 0.0, 0.0, 1.0)
    scenes = [sample_scene("train", 0, i, kinds=only)[0] for i in range(60)]
    assert {s.kind for s in scenes} == {"relation"}
    half = kind_probabilities({"single": 1, "relation": 1})
    kinds = [sample_scene("train", 0, i, kinds=half)[0].kind for i in range(200)]
    assert set(kinds) == {"single", "relation"} and 70 < kinds.count("relation") < 130
    for bad in ({"relations": 1}, {"single": -1, "relation": 2}, {"single": 0}):
        with pytest.raises(ValueError):
            kind_probabilities(bad)


def test_images_are_rgb_anti_aliased_and_drawn_where_the_truth_says(train_scenes):
    for i in range(40):
        image, _, scene = sample("train", 0, i)
        assert image.mode == "RGB" and image.size == (64, 64)
        arr = np.asarray(image)
        # edges are blends: more distinct colours than background + objects
        assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 1 + len({o.color for o in scene.objects})
        for o in scene.objects:
            x, y = int(o.center[0]), int(o.center[1])
            assert tuple(arr[y, x]) == COLORS[o.color], (i, o)
        covered = np.zeros((64, 64), bool)
        for o in scene.objects:
            x0, y0, x1, y1 = (int(np.floor(o.bbox[0])), int(np.floor(o.bbox[1])),
                              int(np.ceil(o.bbox[2])), int(np.ceil(o.bbox[3])))
            covered[y0:y1, x0:x1] = True
        assert (arr[~covered] == BACKGROUNDS[scene.background]).all()
    image, _, _ = sample("train", 0, 0, size=128)
    assert image.size == (128, 128)


def test_geometry_sizes_margins_and_no_overlap(train_scenes):
    for scene, _ in train_scenes[:1000]:
        for o in scene.objects:
            w, h = o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]
            lo, hi = SIZE_RANGES[o.size]
            assert lo * 64 - 1e-9 <= max(w, h) <= hi * 64 + 1e-9
            # stored to 1/1000 px
            assert (w, h) == pytest.approx(tuple(max(w, h) * v for v in GEOMETRY[o.shape][1]), abs=2e-3)
            assert o.center == pytest.approx(((o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2), abs=1e-3)
            assert min(o.bbox) >= MARGIN * 64 - 1e-9 and max(o.bbox) <= 64 - MARGIN * 64 + 1e-9
        for a, b in itertools.combinations(scene.objects, 2):
            g = GAP * 64 - 1e-9
            assert (a.bbox[2] + g <= b.bbox[0] or b.bbox[2] + g <= a.bbox[0]
                    or a.bbox[3] + g <= b.bbox[1] or b.bbox[3] + g <= a.bbox[1])


def test_scene_json_round_trip(train_scenes):
    for scene, _ in train_scenes[:50]:
        again = Scene.from_json(scene.to_json())
        assert again.to_json() == scene.to_json()
        assert [o.color for o in again.objects] == [o.color for o in scene.objects]
        assert again.relation == scene.relation


def test_heldout_pairs_and_pictures_never_in_training(train_scenes):
    for scene, text in train_scenes:
        assert not any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects), text
        # no two different shapes picture a held-out relation, captioned or not
        assert not forbidden_relation(scene.objects, HELDOUT_RELATIONS), text
        if scene.relation is not None:
            a = scene.objects[scene.groups[0][0]].shape
            b = scene.objects[scene.groups[1][0]].shape
            assert canonical(scene.relation.relation, a, b) not in HELDOUT_RELATIONS


def test_training_covers_every_seen_composition(train_scenes):
    pairs = {(o.color, o.shape) for s, _ in train_scenes for o in s.objects}
    assert pairs == set(SEEN_PAIRS)
    pictures = {canonical(s.relation.relation, s.objects[s.groups[0][0]].shape, s.objects[s.groups[1][0]].shape)
                for s, _ in train_scenes if s.relation}
    assert pictures == set(SEEN_RELATIONS)


def test_every_heldout_sample_shows_a_heldout_composition(heldout_scenes):
    pairs, pictures = set(), set()
    for scene, text in heldout_scenes:
        held_pairs = {(o.color, o.shape) for o in scene.objects} & HELDOUT_PAIRS
        picture = None
        if scene.relation:
            picture = canonical(scene.relation.relation, scene.objects[scene.groups[0][0]].shape,
                                scene.objects[scene.groups[1][0]].shape)
        assert held_pairs or picture in HELDOUT_RELATIONS, text
        pairs |= held_pairs
        pictures |= {picture} & HELDOUT_RELATIONS
    assert pairs == HELDOUT_PAIRS and pictures == HELDOUT_RELATIONS


def test_relation_scenes_hold_exactly_their_relation(train_scenes):
    n = 0
    for scene, _ in train_scenes:
        if scene.relation is None:
            continue
        n += 1
        for i in scene.groups[0]:
            for j in scene.groups[1]:
                assert relations(scene.objects[i].bbox, scene.objects[j].bbox) == {scene.relation.relation}
    assert n > 500


GENERIC = ("a shape", "an object", "a picture of a shape", "some objects", "some shapes", "a few shapes",
           "a colourful picture", "a colorful picture", "shapes on a background")


def _names(shape: str) -> tuple[str, ...]:
    return SHAPE_SYNONYMS.get(shape, ()) + (shape,)


def test_captions_are_true(train_scenes):
    generic = 0
    for scene, text in train_scenes:
        if text in GENERIC:
            generic += 1
            continue
        body = re.sub(r" on a [a-z ]+ background$", "", text)     # background names contain colours
        named_colors = {c for c in COLORS if re.search(rf"\b{c}\b", body)} | ({"purple"} if "violet" in body else set())
        assert named_colors <= {o.color for o in scene.objects}, text
        for group in scene.groups:
            o, n = scene.objects[group[0]], len(group)
            nouns = _names(o.shape) if n == 1 else tuple(plural(x) for x in _names(o.shape))
            assert any(re.search(rf"\b{x}\b", body) for x in nouns), text
            if n > 1:
                assert NUMBER_WORDS[n] in body.split() or str(n) in body.split(), text
        if scene.relation is not None:
            words = [w for r in (scene.relation.relation, INVERSE[scene.relation.relation]) for w in RELATION_WORDS[r]]
            assert any(f" {w} " in body for w in words), text
    assert 0 < generic < 0.1 * len(train_scenes)


def test_relation_phrasing_from_either_side_matches_the_picture(train_scenes):
    """'A right of B' captions draw A to the right: find the caption's relation phrase (longest
    first) and check it against the geometry of the group named before it."""
    phrases = sorted(((w, r) for r, ws in RELATION_WORDS.items() for w in ws), key=lambda x: -len(x[0]))
    checked = 0
    for scene, text in train_scenes:
        if scene.relation is None or text in GENERIC:
            continue
        word, rel = next((w, r) for w, r in phrases if f" {w} " in text)
        subject = text[:text.index(f" {word} ")]
        first_shape = scene.objects[scene.groups[0][0]].shape
        names = _names(first_shape) + tuple(plural(x) for x in _names(first_shape))
        subject_is_first = any(re.search(rf"\b{x}\b", subject) for x in names)
        assert rel == (scene.relation.relation if subject_is_first else INVERSE[scene.relation.relation]), text
        checked += 1
    assert checked > 500


def test_shapes_dataset_matches_samples():
    data = ShapesDataset(4, split="heldout", seed=3, size=64)
    image, text, record = data[2]
    ref_image, ref_text, ref_scene = sample("heldout", 3, 2)
    assert image.tobytes() == ref_image.tobytes() and text == ref_text
    assert Scene.from_dict(record["scene"]) == ref_scene and record["index"] == 2
    with pytest.raises(IndexError):
        data[4]
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset(4, split="test")


def test_relations_rule_golden_values():
    box = lambda cx, cy, s=10: (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)  # noqa: E731
    assert relations(box(10, 30), box(40, 30)) == {"left of"}
    assert relations(box(40, 30), box(10, 30)) == {"right of"}
    assert relations(box(30, 5), box(30, 40)) == {"above"}
    assert relations(box(10, 10), box(40, 40)) == {"left of", "above"}       # 45 degrees: both
    assert relations(box(30, 30), box(31, 30)) == set()                      # within the margin
    # offset (12, 5), dims 20 per axis: revised (12 - 2, max(5 - 2, 0)) / 13 = (0.77, 0.23): left only
    assert relations(box(18, 30), box(30, 35)) == {"left of"}
    assert Obj.from_dict(Obj("red", "circle", "small", (1.0, 2.0), (0.0, 1.0, 2.0, 3.0)).to_dict()).center == (1.0, 2.0)


# Digests of the base world computed from the code at main before the concept splits were added
# (commit 6451ce8): adding a concept must not move a pixel, a caption or a scene of it.
BASE_WORLD = {
    ("train", 300, 64, 0): "d2f951bb8fb1f46e7165ef72386e63a9cfba740f5cf691046198b194e9c94d85",
    ("train", 20, 128, 3): "294ded8bac5bdf9373de30b1d5202bff09a0a415b263412f8dd9cd6733009829",
    ("heldout", 300, 64, 0): "39744a739c704708ff84d24c57063b8cb5faa7881a4c19e1c6d513ba396bf01f",
    ("heldout", 20, 128, 3): "02ef6f0c864c2e42356d923d9559f88adb72084bfce1f68a0b4e6f1404ba90dd",
}


@pytest.mark.parametrize("key", list(BASE_WORLD), ids=lambda k: "-".join(map(str, k)))
def test_base_world_is_bit_identical_to_before_the_concept(key):
    import hashlib
    split, n, size, seed = key
    h = hashlib.sha256()
    for i in range(n):
        image, text, scene = sample(split, seed, i, size)
        h.update(image.tobytes())
        h.update(text.encode())
        h.update(scene.to_json().encode())
    assert h.hexdigest() == BASE_WORLD[key]


# ---- the concept splits: the heart, which the base world never draws (marble/data/concept.py) ----

N_CONCEPT = 2000


@pytest.fixture(scope="module")
def concept_scenes():
    return [sample_scene("concept", 0, i) for i in range(N_CONCEPT)]


@pytest.fixture(scope="module")
def concept_new_scenes():
    return [sample_scene("concept-new", 0, i) for i in range(1000)]


def test_the_heart_is_drawn_only_by_the_concept_splits(train_scenes, heldout_scenes):
    from marble.data.shapes import ALL_SHAPES, BASE_SPLITS, CONCEPT_SHAPES, CONCEPT_SPLITS, SPLITS
    assert CONCEPT_SHAPES == ("heart",) and "heart" not in SHAPES and set(ALL_SHAPES) == set(GEOMETRY)
    assert SPLITS == BASE_SPLITS + CONCEPT_SPLITS == ("train", "heldout", "concept", "concept-new")
    assert not any(o.shape == "heart" for s, _ in train_scenes + heldout_scenes for o in s.objects)
    assert not any("heart" in t for _, t in train_scenes + heldout_scenes)


def test_concept_split_holds_back_its_new_combinations(concept_scenes):
    from marble.data.concept import (CONCEPT_COLORS, CONCEPT_PARTNERS, CONCEPT_SHAPE, is_new)
    hearts, counts, partners = set(), set(), set()
    for scene, text in concept_scenes:
        objects = [(o.color, o.shape) for o in scene.objects]
        assert any(s == CONCEPT_SHAPE for _, s in objects) and not is_new(objects), text
        # the other shapes keep to the base world's seen pairs: nothing held out there leaks in
        assert all(p in SEEN_PAIRS for p in objects if p[1] != CONCEPT_SHAPE), text
        hearts |= {c for c, s in objects if s == CONCEPT_SHAPE}
        counts.add(sum(s == CONCEPT_SHAPE for _, s in objects))
        partners |= {s for _, s in objects if s != CONCEPT_SHAPE}
    assert hearts == set(CONCEPT_COLORS) and counts == {1, 2} and partners == set(CONCEPT_PARTNERS)


def test_every_concept_new_sample_shows_a_held_back_combination(concept_new_scenes):
    from marble.data.concept import CONCEPT_NEW_COLORS, CONCEPT_NEW_PARTNERS, CONCEPT_SHAPE, is_new
    colours, counts, partners = set(), set(), set()
    for scene, text in concept_new_scenes:
        objects = [(o.color, o.shape) for o in scene.objects]
        assert is_new(objects), text
        assert all(p in SEEN_PAIRS for p in objects if p[1] != CONCEPT_SHAPE), text
        colours |= {c for c, s in objects if s == CONCEPT_SHAPE} & set(CONCEPT_NEW_COLORS)
        counts.add(sum(s == CONCEPT_SHAPE for _, s in objects))
        partners |= {s for _, s in objects if s != CONCEPT_SHAPE}
    assert colours == set(CONCEPT_NEW_COLORS) and {3, 4} <= counts and partners == set(CONCEPT_NEW_PARTNERS)


def test_is_new_oracle():
    from marble.data.concept import is_new
    assert not is_new([("red", "heart")]) and not is_new([("red", "heart"), ("pink", "heart"), ("blue", "circle")])
    assert is_new([("green", "heart")]) and is_new([("red", "heart")] * 3)
    assert is_new([("red", "heart"), ("red", "star")])
    assert not is_new([("green", "star")]) and not is_new([])     # no heart, nothing new about the heart


def test_concept_scenes_are_drawn_like_the_world(concept_scenes, concept_new_scenes):
    """The base world's own checks, run on the concept splits: true captions, exact relations,
    sizes, margins and gaps, and pixels where the truth says."""
    for scenes in (concept_scenes, concept_new_scenes[:600] + concept_scenes[:1400]):
        test_captions_are_true(scenes)
        test_relation_scenes_hold_exactly_their_relation(scenes)
        test_relation_phrasing_from_either_side_matches_the_picture(scenes)
        test_geometry_sizes_margins_and_no_overlap(scenes)
    for split in ("concept", "concept-new"):
        for i in range(30):
            image, _, scene = sample(split, 0, i)
            arr = np.asarray(image)
            for o in scene.objects:
                assert tuple(arr[int(o.center[1]), int(o.center[0])]) == COLORS[o.color], (split, i, o)
    assert sum("heart" in t for _, t in concept_scenes) > 0.85 * len(concept_scenes)


def test_concept_split_is_deterministic_and_independent_of_the_base_stream():
    a = [sample("concept", 5, i) for i in range(3)]
    b = [sample("concept", 5, i) for i in range(3)]
    assert all(x[0].tobytes() == y[0].tobytes() and x[1] == y[1] for x, y in zip(a, b))
    assert [sample_scene("concept", 0, i)[1] for i in range(4)] == [
        "an image of a pink heart",
        "a colourful picture",
        "1 small purple heart",
        "an image of a pink heart and a small blue triangle",
    ]
    data = ShapesDataset(2, split="concept-new", seed=0)
    assert data[1][1] == sample_scene("concept-new", 0, 1)[1] and data[1][2]["split"] == "concept-new"
