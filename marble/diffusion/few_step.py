"""Few-step models and the settings their model cards give.

A few-step model (SD-Turbo, an LCM or LCM-LoRA, marble's own distilled model) works only near the
sampler, spacing, steps and guidance it was distilled for. `FewStepSettings` records them; a model
carries them in its config (`few_step`, see marble.models.latent_diffusion) or a request names a
preset. Steps or CFG outside the card's range are allowed but warned about (`warnings`), naming
the card's settings: an image at 20 steps from SD-Turbo is a user's right, just not a good one.

CFG is marble's (A1111's) scale: 1 is the conditional prediction alone, 0 the unconditional one.
diffusers' `guidance_scale=0.0` in the SD-Turbo card means "guidance off", which is marble's 1.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FewStepSettings:
    card: str                       # where the settings come from, named in warnings
    sampler: str                    # a registered sampler name (marble.diffusion.samplers)
    spacing: str                    # a sigma spacing name (marble.diffusion.schedule.SPACINGS)
    steps: tuple[int, int]          # supported steps, inclusive
    cfg: tuple[float, float]        # supported CFG scale, inclusive (marble's scale: 1 = guidance off)
    default_steps: int
    default_cfg: float

    def __post_init__(self):
        lo, hi = self.steps
        if not 1 <= lo <= self.default_steps <= hi:
            raise ValueError(f"few-step settings: steps {self.steps} must hold default_steps {self.default_steps}")
        if not 0 <= self.cfg[0] <= self.default_cfg <= self.cfg[1]:
            raise ValueError(f"few-step settings: cfg {self.cfg} must hold default_cfg {self.default_cfg}")

    def describe(self) -> str:
        """The settings in one phrase, as a warning names them."""
        steps = f"{self.steps[0]}" if self.steps[0] == self.steps[1] else f"{self.steps[0]}-{self.steps[1]}"
        cfg = f"{self.cfg[0]:g}" if self.cfg[0] == self.cfg[1] else f"{self.cfg[0]:g}-{self.cfg[1]:g}"
        return f"{self.card}: sampler {self.sampler}, {self.spacing} spacing, {steps} steps, CFG {cfg}"


PRESETS: dict[str, FewStepSettings] = {
    # stabilityai/sd-turbo and sdxl-turbo cards: 1 step is enough, 1-4 steps (ADD), guidance_scale=0.0
    # (guidance off); their scheduler is Euler (ancestral in the SDXL-Turbo/ComfyUI examples) on
    # "trailing" timesteps, which start at t = 999 for every step count.
    "sd-turbo": FewStepSettings("the SD-Turbo model card", "Euler a", "trailing", (1, 4), (1.0, 1.0), 1, 1.0),
    # latent-consistency/lcm-lora-sdv1-5 and -sdxl cards: LCMScheduler, 2-8 steps, guidance off or
    # guidance_scale in [1, 2]; the card's examples run 4 steps.
    "lcm-lora": FewStepSettings("the LCM-LoRA model card", "LCM", "lcm", (2, 8), (1.0, 2.0), 4, 1.0),
}


def get_preset(name: str) -> FewStepSettings:
    key = name.strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    return PRESETS[key]


def few_step_warnings(settings: FewStepSettings, steps: int, cfg: float) -> list[str]:
    """One line for steps, one for CFG, where they fall outside what the card supports."""
    out = []
    lo, hi = settings.steps
    if not lo <= steps <= hi:
        out.append(f"{steps} steps is outside what this few-step model supports; {settings.describe()}")
    if not settings.cfg[0] <= cfg <= settings.cfg[1]:
        hint = " (CFG 0 is the unconditional prediction; guidance off is CFG 1)" if cfg == 0 else ""
        out.append(f"CFG {cfg:g} is outside what this few-step model supports{hint}; {settings.describe()}")
    return out
