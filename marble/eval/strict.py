"""The strict verdict, reported beside GenEval's: the image shows exactly what the prompt says.

GenEval's rules (marble.eval.verdict) are lenient where compositional models fail: two objects
checks shapes only, so "a pink circle and a blue diamond" drawn with the colours swapped passes;
counting ignores colour and other shapes; position may be judged on an object of the wrong colour
and passes on a diagonal. The strict verdict, for every category:

1. **Exactly the prompt's objects.** For each named object, exactly its count of detections with
   its shape and its colour (any colour where the prompt names none); and nothing else: the image
   holds no detection beyond the named ones. Sizes are not scored (as in GenEval).
2. **Position between the named objects, on the stated axis.** After 1, every (A, B) pair of the
   named objects (one of each in every position prompt) must hold the stated relation by GenEval's
   rule (marble.data.scene.relations) and no other relation: a placement that is also "above"
   when "left of" was asked is diagonal-ambiguous and fails.

Each verdict returns (passed, reason); the reason names what is missing, extra or misplaced.
"""
from __future__ import annotations

from typing import Sequence

from marble.data.scene import relations
from marble.eval.detector import Detection
from marble.eval.prompts import Need, Requirement


def _named(need: Need) -> str:
    return f"{need.color} {need.shape}" if need.color else need.shape


def _matches(need: Need, d: Detection) -> bool:
    return d.shape == need.shape and (need.color is None or d.color == need.color)


def _exact_objects(objects: Sequence[Need], found: Sequence[Detection]) -> tuple[list[list[Detection]], str]:
    """Each need's detections, and "" when the image holds exactly the needs; else the reason."""
    groups = [[d for d in found if _matches(need, d)] for need in objects]
    wrong = [f"{len(g)} {_named(n)} (expected {n.count})" for n, g in zip(objects, groups) if len(g) != n.count]
    claimed = {id(d) for g in groups for d in g}
    extra = [f"{d.color} {d.shape}" for d in found if id(d) not in claimed]
    problems = wrong + ([f"extra {', '.join(extra)}"] if extra else [])
    return groups, "; ".join(problems)


def judge_strict(requirement: Requirement, found: Sequence[Detection]) -> tuple[bool, str]:
    """(passed, reason) for one image's detections under the strict rules above."""
    groups, problem = _exact_objects(requirement.objects, found)
    if problem:
        return False, problem
    if requirement.category != "position":
        return True, ""
    for a in groups[0]:
        for b in groups[1]:
            held = relations(a.bbox, b.bbox)
            if held != {requirement.relation}:
                return False, (f"{a.color} {a.shape} at ({a.center[0]:.0f}, {a.center[1]:.0f}) is "
                               f"{' and '.join(sorted(held)) or 'not clearly placed'} relative to "
                               f"{b.color} {b.shape} at ({b.center[0]:.0f}, {b.center[1]:.0f}); "
                               f"expected only {requirement.relation}")
    return True, ""
