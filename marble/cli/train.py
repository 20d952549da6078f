"""`marble train vae CONFIG`, `marble train diffusion CONFIG` (also under torchrun), `marble train lora CONFIG`,
`marble train lcm CONFIG` and `marble train controlnet CONFIG`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from marble.cli.app import app, fail

train_app = typer.Typer(help="Train a VAE, a diffusion U-Net, a LoRA, a few-step LCM student or a ControlNet from a TOML config "
                             "(see configs/).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")


def _run(kind: str, config: Path, resume: bool, run_dir: Optional[Path], steps: Optional[int]) -> None:
    from marble.errors import ModelLoadError
    from marble.train.config import ConfigError, load_config
    from marble.train.distributed import init_world, shutdown

    overrides = {"kind": kind}
    if run_dir is not None:
        overrides["run_dir"] = str(run_dir)
    if steps is not None:
        overrides["steps"] = steps
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        fail(str(e))
    out = Path(cfg.run_dir)
    if not resume and (out / "checkpoint.pt").exists():
        fail(f"{out} already holds a run; pass --resume to continue it, or choose another run_dir")
    import torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = init_world()
    try:
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / "config.json")
        if kind == "vae":
            from marble.train.vae import train_vae
            result = train_vae(cfg, world, resume)
        elif kind == "lora":
            from marble.train.lora import train_lora
            result = train_lora(cfg, world, resume)
        elif kind == "lcm":
            from marble.train.lcm import train_lcm
            result = train_lcm(cfg, world, resume)
        elif kind == "controlnet":
            from marble.train.controlnet import train_controlnet
            result = train_controlnet(cfg, world, resume)
        else:
            from marble.train.diffusion import train_diffusion
            result = train_diffusion(cfg, world, resume)
    except (ConfigError, ModelLoadError) as e:
        fail(str(e))
    finally:
        shutdown(world)
    if world.is_main:
        typer.echo(str(result))


def _register(kind: str, doc: str) -> None:
    """One `marble train KIND` command: every kind takes the same arguments."""
    def command(
        config: Path = typer.Argument(..., help="TOML config: kind, run_dir, steps, batch and the model, data and optim tables."),
        resume: bool = typer.Option(False, "--resume", help="Continue from run_dir/checkpoint.pt exactly."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Override the config's run_dir."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Override the config's step count."),
    ) -> None:
        _run(kind, config, resume, run_dir, steps)

    command.__doc__ = doc
    train_app.command(kind)(command)


_register("vae", "Train the KL autoencoder; writes RUN_DIR/vae.safetensors.")
_register("diffusion", "Train the denoiser (U-Net or MMDiT) by noise, v or flow prediction on cached latents; "
                       "writes RUN_DIR/model.safetensors.")
_register("lora", "Train a LoRA on an image folder on top of a frozen model; writes RUN_DIR/NAME.safetensors "
                  "(kohya format). See docs/lora-training.md.")
_register("lcm", "Distil a model into a few-step student without CFG by latent consistency distillation; writes "
                 "RUN_DIR/model.safetensors. See docs/few-step.md.")
_register("controlnet", "Train a ControlNet for a frozen model on the shapes world's sketches (flat-coloured "
                        "silhouettes); writes RUN_DIR/controlnet.safetensors. See docs/controlnet-training.md.")
