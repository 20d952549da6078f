"""`marble generate --control IMAGE --control-model PATH ...`: ControlNet units from flags and records.

The --control-* flags are repeatable as a group: the i-th value of each belongs to the i-th
--control image. A flag is given for every unit or for none (its default then: module none,
weight 1, start 0, end 1, Balanced, Crop and Resize, processor resolution 512, pixel perfect off). With --from, a record's units are replayed
when their control images are given again (--control, in the same order); flags still override.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from marble.cli.app import fail, warn

OPTIONS = ("model", "module", "weight", "start", "end", "mode", "resize", "processor_res", "pixel_perfect")
_SWITCH = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class ControlFlags:
    image: Path
    model: str | None = None
    module: str | None = None
    weight: float | None = None
    start: float | None = None
    end: float | None = None
    mode: str | None = None
    resize: str | None = None
    processor_res: int | None = None    # -1: the default
    pixel_perfect: bool | None = None
    model_is_path: bool | None = None   # None: decided by whether the path exists
    expected_sha: str | None = None     # from a record: the control image it was made with


def control_flags(images: list[Path] | None, **values: list | None) -> tuple[ControlFlags, ...] | None:
    """The units the flags describe; one line and exit 2 when the group does not line up."""
    images = images or []
    given = {k: v for k, v in values.items() if v}
    if not images:
        if given:
            fail(f"--control-{next(iter(given)).replace('_', '-')} needs --control IMAGE")
        return None
    for key, vals in given.items():
        if len(vals) != len(images):
            fail(f"--control-{key.replace('_', '-')} was given {len(vals)} times for {len(images)} --control images; "
                 "give it once per image, or not at all")
    if "pixel_perfect" in given:
        bad = [v for v in given["pixel_perfect"] if str(v).strip().lower() not in _SWITCH]
        if bad:
            fail(f"--control-pixel-perfect {bad[0]!r}: give on or off")
        given["pixel_perfect"] = [_SWITCH[str(v).strip().lower()] for v in given["pixel_perfect"]]
    return tuple(ControlFlags(image, **{k: v[i] for k, v in given.items()}) for i, image in enumerate(images))


def merge_record_controls(flags: tuple[ControlFlags, ...] | None, units: tuple[dict, ...]):
    """A record's units under the given --control images (flags win); a warning when they cannot be replayed."""
    if not units:
        return flags
    if not flags:
        warn(f"the record has {len(units)} ControlNet unit(s), not replayed: give their control images again "
             "with --control (in order)")
        return flags
    merged = []
    for i, unit in enumerate(flags):
        if i >= len(units):
            merged.append(unit)
            continue
        e = units[i]
        recorded = {"model": e.get("path") or e["model"], "module": e["module"], "weight": e["weight"],
                    "start": e["guidance_start"], "end": e["guidance_end"], "mode": e["control_mode"],
                    "resize": e["resize_mode"], "processor_res": e.get("processor_res"),
                    "pixel_perfect": e.get("pixel_perfect")}
        fill = {k: v for k, v in recorded.items() if getattr(unit, k) is None and v is not None}
        if "model" in fill:
            fill["model_is_path"] = "path" in e
        merged.append(replace(unit, **fill, expected_sha=e.get("image_sha256")))
    return tuple(merged)


def read_controls(units: tuple[ControlFlags, ...] | None, read_image) -> tuple:
    """ControlSpecs with their images read (`read_image(path, what)` -> (image, sha256))."""
    from marble.adapters.controlnet import ControlSpec
    specs = []
    for i, u in enumerate(units or ()):
        if not u.model:
            fail(f"--control {u.image}: a ControlNet is required (--control-model PATH or a name in --control-dir)")
        image, sha = read_image(u.image, "control image")
        if u.expected_sha and sha != u.expected_sha:
            warn(f"the control image {u.image} differs from the one the record was made with (sha256)")
        is_path = Path(u.model).expanduser().exists() if u.model_is_path is None else u.model_is_path
        defaults = ControlSpec()
        specs.append(ControlSpec(
            image=image, model=u.model, is_path=is_path, image_path=str(u.image), image_sha256=sha,
            **{k: getattr(u, k) if getattr(u, k) is not None else getattr(defaults, k)
               for k in ("module", "weight", "start", "end", "mode", "resize", "pixel_perfect")},
            processor_res=None if u.processor_res is None or u.processor_res < 0 else u.processor_res))
    return tuple(specs)
