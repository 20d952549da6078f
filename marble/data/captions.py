"""Captions for the shapes world: several phrasings per fact, number words and digits, synonyms.

Every caption is true of its scene. Colour, shape and size words have a few synonyms; counts are
written as words or digits; a relation is phrased from either side ("a circle left of a square",
"a square to the right of a circle"). A few captions leave things out (no colour, or a generic
"a shape"), so that under-specified prompts have a meaning the probe can compare against.

`phrase` and `canonical_*` give the benchmark's fixed phrasings, the commonest training ones.
"""
from __future__ import annotations

import numpy as np

from marble.data.scene import INVERSE, Scene

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
COLOR_SYNONYMS = {"purple": ("purple", "violet"), "gray": ("gray", "grey")}
SHAPE_SYNONYMS = {"diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

SINGLE = ("{one}", "{one}", "a picture of {one}", "an image of {one}", "there is {one}",
          "{one} on a {bg} background", "a drawing of {one}", "one {bare}", "1 {bare}", "a single {bare}")
MANY = ("{many}", "{many}", "a picture of {many}", "there are {many}", "{many} on a {bg} background",
        "exactly {many}", "an image of {many}")
TWO = ("{a} and {b}", "{a} and {b}", "a picture of {a} and {b}", "{a} with {b}", "{a} and {b} on a {bg} background",
       "an image of {a} and {b}")
RELATION = ("{a} {rel} {b}", "{a} {rel} {b}", "{a} is {rel} {b}", "a picture of {a} {rel} {b}",
            "{a} placed {rel} {b}", "{a} {rel} {b} on a {bg} background")
GENERIC_ONE = ("a shape", "an object", "a picture of a shape")
GENERIC_MANY = ("some objects", "some shapes", "a few shapes")
GENERIC_ANY = ("a colourful picture", "a colorful picture", "shapes on a background")
P_GENERIC = 0.05        # caption says nothing specific
P_NO_COLOR = 0.05       # single/count captions that leave the colour out
P_SIZE = 0.4            # noun phrases that state the size
P_SYNONYM = 0.3


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def words(color: str | None, shape: str, size: str | None, n: int) -> str:
    """ "small red circle", "violet stars": the noun phrase without its determiner."""
    noun = shape if n == 1 else plural(shape)
    return " ".join(w for w in (size, color, noun) if w)


def phrase(color: str | None, shape: str, count: int = 1, size: str | None = None, digits: bool = False) -> str:
    """ "a red circle", "three green triangles", "3 green triangles": a noun phrase with determiner."""
    body = words(color, shape, size, count)
    if count == 1:
        return f"{article(body)} {body}"
    return f"{count if digits else NUMBER_WORDS[count]} {body}"


def canonical_relation(relation: str) -> str:
    return RELATION_WORDS[relation][0]


def _choose(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _syn(rng: np.random.Generator, table: dict, word: str) -> str:
    return _choose(rng, table[word]) if word in table and rng.random() < P_SYNONYM else word


def _group_words(rng, scene: Scene, group, allow_no_color: bool) -> tuple[str, int]:
    obj = scene.objects[group[0]]
    color = None if allow_no_color and rng.random() < P_NO_COLOR else _syn(rng, COLOR_SYNONYMS, obj.color)
    size = _choose(rng, SIZE_WORDS[obj.size]) if rng.random() < P_SIZE else None
    return words(color, _syn(rng, SHAPE_SYNONYMS, obj.shape), size, len(group)), len(group)


def _determined(rng, body: str, n: int) -> str:
    if n == 1:
        return f"{article(body)} {body}"
    return f"{n if rng.random() < 0.3 else NUMBER_WORDS[n]} {body}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for `scene`, drawn from the templates with `rng`."""
    bg = _syn(rng, COLOR_SYNONYMS, scene.background)
    if rng.random() < P_GENERIC:
        pool = GENERIC_ONE if len(scene.objects) == 1 else GENERIC_MANY
        return _choose(rng, pool + GENERIC_ANY)
    if scene.kind in ("single", "count"):
        body, n = _group_words(rng, scene, scene.groups[0], allow_no_color=True)
        if n == 1:
            return _choose(rng, SINGLE).format(one=_determined(rng, body, 1), bare=body, bg=bg)
        return _choose(rng, MANY).format(many=_determined(rng, body, n), bg=bg)
    (wa, na), (wb, nb) = (_group_words(rng, scene, g, allow_no_color=False) for g in scene.groups[:2])
    a, b = _determined(rng, wa, na), _determined(rng, wb, nb)
    if scene.kind == "two":
        if rng.random() < 0.5:
            a, b = b, a
        return _choose(rng, TWO).format(a=a, b=b, bg=bg)
    relation = scene.relation.relation
    if rng.random() < 0.5:   # the same picture, phrased from the other group
        a, b, na, relation = b, a, nb, INVERSE[relation]
    template = _choose(rng, RELATION)
    if na > 1:
        template = template.replace(" is ", " are ")     # "two circles are above ..."
    return template.format(a=a, rel=_choose(rng, RELATION_WORDS[relation]), b=b, bg=bg)
