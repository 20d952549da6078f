"""The typer application and the one way the CLI reports bad input."""
from __future__ import annotations

import sys
from typing import NoReturn

import typer

app = typer.Typer(
    name="marble",
    help="marble: text-to-image latent diffusion (txt2img, img2img, inpainting, training, serving).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr, no traceback, a non-zero exit (2 = usage error)."""
    typer.echo(f"marble: error: {message}", err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    typer.echo(f"marble: warning: {message}", err=True)


def info(message: str) -> None:
    typer.echo(message, err=True)
