"""Whether an image satisfies its prompt: GenEval's rules (Ghosh et al. 2023), on exact detections.

- single_object: at least one object of the shape;
- two_objects: at least one object of each of the two shapes;
- counting: exactly `count` objects of the shape (GenEval: at least n and fewer than n+1); the
  colour in the prompt is not scored here, `colors` scores colour;
- colors: at least one object of the shape, and every object of that shape has the colour
  (GenEval checks its most confident detection; an exact detector has no ranking, so all of them);
- position: objects of both shapes, and the relation holding between every pair of them by
  GenEval's rule (marble.data.scene.relations: centre offset less 0.1 of the summed dimensions);
  where objects of a shape carry the prompt's colour only those are taken;
- color_attr: at least one object with each (colour, shape) pair.
Sizes are not scored. Each verdict returns (passed, reason); the reason says what failed.
"""
from __future__ import annotations

from typing import Sequence

from marble.data.scene import relations
from marble.eval.detector import Detection
from marble.eval.prompts import Requirement


def _of(found: Sequence[Detection], shape: str) -> list[Detection]:
    return [d for d in found if d.shape == shape]


def _describe(found: Sequence[Detection]) -> str:
    return ", ".join(f"{d.color} {d.shape}" for d in found) or "nothing"


def judge(requirement: Requirement, found: Sequence[Detection]) -> tuple[bool, str]:
    """(passed, reason) for one image's detections."""
    cat, objs = requirement.category, requirement.objects
    if cat == "single_object":
        s = objs[0].shape
        return (True, "") if _of(found, s) else (False, f"no {s}; found {_describe(found)}")
    if cat == "two_objects":
        missing = [o.shape for o in objs if not _of(found, o.shape)]
        return (not missing, f"no {' and no '.join(missing)}; found {_describe(found)}" if missing else "")
    if cat == "counting":
        need = objs[0]
        n = len(_of(found, need.shape))
        return (n == need.count, "" if n == need.count else f"expected {need.count} {need.shape}, found {n}")
    if cat == "colors":
        need = objs[0]
        mine = _of(found, need.shape)
        if not mine:
            return False, f"no {need.shape}; found {_describe(found)}"
        wrong = [d.color for d in mine if d.color != need.color]
        return (not wrong, f"expected {need.color} {need.shape}, found {_describe(mine)}" if wrong else "")
    if cat == "position":
        groups = []
        for need in objs[:2]:
            mine = _of(found, need.shape)
            coloured = [d for d in mine if d.color == need.color]
            groups.append(coloured or mine)
        if not all(groups):
            missing = [n.shape for n, g in zip(objs, groups) if not g]
            return False, f"no {' and no '.join(missing)}; found {_describe(found)}"
        for a in groups[0]:
            for b in groups[1]:
                held = relations(a.bbox, b.bbox)
                if requirement.relation not in held:
                    return False, (f"{a.shape} at ({a.center[0]:.0f}, {a.center[1]:.0f}) is "
                                   f"{' and '.join(sorted(held)) or 'not clearly placed'} relative to "
                                   f"{b.shape} at ({b.center[0]:.0f}, {b.center[1]:.0f})")
        return True, ""
    if cat == "color_attr":
        missing = [f"{o.color} {o.shape}" for o in objs if not any(d.shape == o.shape and d.color == o.color
                                                                   for d in found)]
        return (not missing, f"no {' and no '.join(missing)}; found {_describe(found)}" if missing else "")
    raise ValueError(f"no verdict for category {cat!r}")
