"""The GenEval-style benchmark: prompts x seeds -> images -> exact detections -> verdicts.

The benchmark knows nothing about models: an image source is any callable
`generate(prompt: str, seed: int) -> PIL.Image.Image` (marble.eval.baselines has two).
A category's accuracy is the share of its images that pass; the overall score is the mean of the
category accuracies, as GenEval reports it. Every image is also judged by the strict rules
(marble.eval.strict: exactly the prompt's objects, position on the stated axis only), reported
beside GenEval's as `strict_accuracy` per category and `overall_strict`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from PIL import Image

from marble.eval.detector import Detection, detect
from marble.eval.prompts import CATEGORIES, Prompt
from marble.eval.strict import judge_strict
from marble.eval.verdict import judge

Generate = Callable[[str, int], Image.Image]
OnImage = Callable[[Prompt, int, Image.Image, bool], None]   # (prompt, seed, image, passed)


@dataclass
class ImageVerdict:
    seed: int
    passed: bool
    reason: str
    found: list[Detection]
    strict: bool = False
    strict_reason: str = ""

    def to_dict(self) -> dict:
        return {"seed": self.seed, "pass": self.passed, "reason": self.reason, "strict_pass": self.strict,
                "strict_reason": self.strict_reason, "detected": [d.to_dict() for d in self.found]}


@dataclass
class PromptResult:
    prompt: Prompt
    images: list[ImageVerdict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"category": self.prompt.category, "prompt": self.prompt.text,
                "requirement": self.prompt.requirement.to_dict(), "images": [v.to_dict() for v in self.images]}


@dataclass
class BenchmarkResult:
    prompts: list[PromptResult]
    seconds: float

    def per_category(self) -> dict[str, dict]:
        """category -> {accuracy, passed, images, prompts, strict_accuracy, strict_passed}, in
        GenEval's category order."""
        out = {}
        for cat in CATEGORIES:
            rows = [r for r in self.prompts if r.prompt.category == cat]
            if not rows:
                continue
            verdicts = [v.passed for r in rows for v in r.images]
            strict = [v.strict for r in rows for v in r.images]
            out[cat] = {"accuracy": sum(verdicts) / len(verdicts), "passed": sum(verdicts),
                        "images": len(verdicts), "prompts": len(rows),
                        "strict_accuracy": sum(strict) / len(strict), "strict_passed": sum(strict)}
        return out

    def overall(self, key: str = "accuracy") -> float:
        """The mean of the category accuracies; key="strict_accuracy" for the strict score."""
        cats = self.per_category()
        return sum(c[key] for c in cats.values()) / len(cats) if cats else 0.0

    def to_dict(self) -> dict:
        return {"categories": self.per_category(), "overall": self.overall(),
                "overall_strict": self.overall("strict_accuracy"),
                "images": sum(len(r.images) for r in self.prompts), "seconds": round(self.seconds, 3),
                "prompts": [r.to_dict() for r in self.prompts]}


def run_benchmark(generate: Generate, prompts: Sequence[Prompt], seeds: Sequence[int],
                  on_image: OnImage | None = None) -> BenchmarkResult:
    """Every prompt with every seed, generated, detected and judged in order. A prompt text that
    recurs (single_object and colors share phrasings) is generated once per seed."""
    start = time.perf_counter()
    results = []
    seen: dict[tuple[str, int], tuple[Image.Image, list[Detection]]] = {}   # a text in two categories
    for prompt in prompts:
        row = PromptResult(prompt)
        for seed in seeds:
            key = (prompt.text, seed)
            if key not in seen:
                image = generate(prompt.text, seed)
                seen[key] = (image, detect(image))
            image, found = seen[key]
            passed, reason = judge(prompt.requirement, found)
            strict, strict_reason = judge_strict(prompt.requirement, found)
            row.images.append(ImageVerdict(seed, passed, reason, found, strict, strict_reason))
            if on_image is not None:
                on_image(prompt, seed, image, passed)
        results.append(row)
    return BenchmarkResult(results, time.perf_counter() - start)


def markdown_table(result: BenchmarkResult) -> str:
    """GenEval's accuracy and the strict one side by side, per category and overall."""
    lines = ["| category | accuracy | strict | passed / images | strict passed | prompts |",
             "|---|---:|---:|---:|---:|---:|"]
    for cat, c in result.per_category().items():
        lines.append(f"| {cat} | {c['accuracy']:.3f} | {c['strict_accuracy']:.3f} | {c['passed']} / {c['images']} "
                     f"| {c['strict_passed']} | {c['prompts']} |")
    lines.append(f"| **overall** | **{result.overall():.3f}** | **{result.overall('strict_accuracy'):.3f}** | | | |")
    return "\n".join(lines)
