"""The web UI: one static page of our own (marble/server/static/), plus the gallery's JSON and files.

Why not Gradio: it pulls in a large dependency tree and its own frontend build for what is one
form, a canvas and a grid; a static page calls the same A1111 routes any client uses, so the UI
exercises the public API. Its live mode (live.js) uses /api/live (live_api.py), open to any client too.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from marble.data.shapes import BACKGROUNDS, COLORS
from marble.server.state import state_of

STATIC = Path(__file__).with_name("static")
_FILES = {"app.js": "text/javascript", "live.js": "text/javascript", "sketch.js": "text/javascript",
          "style.css": "text/css"}

router = APIRouter(tags=["web UI"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if name not in _FILES:
        raise HTTPException(404, f"no UI file {name!r}")
    return FileResponse(STATIC / name, media_type=_FILES[name])


@router.get("/api/models", summary="Loaded models with their defaults (for the web UI)")
async def models(request: Request) -> list[dict]:
    out = []
    for worker in state_of(request).workers.values():
        c = worker.pipe.model.config
        out.append({"name": worker.name, "hash": worker.pipe.loaded.hash, "default_width": c.default_width,
                    "default_height": c.default_height, "default_steps": c.default_steps,
                    "default_cfg": c.default_cfg, "default_sampler": c.default_sampler,
                    "size_multiple": worker.pipe.model.latent_factor})
    return out


@router.get("/api/sketch", summary="The sketch pad's palette and the ControlNet folder (for the web UI)")
async def sketch(request: Request) -> dict:
    """The shapes world's colours on its white background: what the built-in ControlNet was trained
    to read (marble.data.sketch), served so the page and the training data keep one palette."""
    folder = state_of(request).worker(None).pipe.controlnets.folder
    return {"palette": {name: list(rgb) for name, rgb in COLORS.items()},
            "background": list(BACKGROUNDS["white"]), "controlnet_dir": str(folder)}


@router.get("/api/outputs", summary="Past outputs, newest first, with their generation records")
async def outputs(request: Request, offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=500)) -> dict:
    state = state_of(request)
    total, entries = await state.offload(state.store.list, offset, limit)
    return {"total": total, "offset": offset, "items": [e.to_json() for e in entries]}


@router.get("/outputs/{name}", summary="One saved PNG (with its record in the text chunks)")
async def output_file(name: str, request: Request) -> FileResponse:
    path = state_of(request).store.path(name)
    if path is None:
        raise HTTPException(404, f"no output named {name!r}")
    return FileResponse(path, media_type="image/png")
