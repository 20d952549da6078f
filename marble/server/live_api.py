"""The live mode's routes: one Server-Sent Events stream per page, and the requests that feed it.

    GET  /api/live                    the live settings (model, steps, sampler, cfg, debounce, limit)
    GET  /api/live/stream             text/event-stream: `ready` {stream, ...settings}, then
                                      `image` {seq, png, parameters, record, seconds} and
                                      `failed` {seq, status, detail}; a `: ping` comment every 15 s
    POST /api/live/{stream}           {seq, prompt, negative_prompt, seed, steps, cfg_scale,
                                      sampler_name, width, height}: 202, the image comes on the stream
    POST /api/live/{stream}/keep      {seq}: save that (recent) result to the outputs, as the gallery's

Why SSE rather than WebSocket: results flow one way (server to page) and requests are ordinary
POSTs, so a plain streaming response does it with no extra dependency (uvicorn serves WebSockets
only with the `websockets` or `wsproto` package, which marble does not install); EventSource
reconnects by itself, and the stream passes through the API-key middleware and proxies as any GET.
"""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from marble.png import png_bytes
from marble.request import GenerationRequest
from marble.server.errors import error_response
from marble.server.images import to_base64
from marble.server.live import LiveStream, StaleRequest, TooManyStreams, sse
from marble.server.state import ServerState, state_of
from marble.server.worker import DISCONNECTED, SUPERSEDED, Cancelled, Job

router = APIRouter(prefix="/api/live", tags=["live mode"])
PING_SECONDS = 15.0


class LiveParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    seq: int = Field(ge=0, description="The page's request number; it must grow within a stream.")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: random (a live page fixes one, so the image follows the prompt only).")
    steps: int | None = Field(None, description="Default: the live setting.")
    cfg_scale: float | None = Field(None, description="Default: the live setting.")
    sampler_name: str | None = Field(None, description="Default: the live setting.")
    width: int | None = None
    height: int | None = None


class KeepParams(BaseModel):
    seq: int


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def settings(state: ServerState) -> dict:
    d = state.live_defaults
    c = state.live.config
    return {"model": state.live_worker.name, "steps": d.steps, "sampler": d.sampler, "cfg": d.cfg,
            "width": d.width, "height": d.height, "lora": c.lora.name if c.lora else None,
            "debounce_ms": c.debounce_ms, "streams_per_client": c.streams_per_client}


@router.get("", summary="The live mode's settings")
async def live_settings(request: Request) -> dict:
    return settings(state_of(request))


@router.get("/stream", summary="Open a live stream (Server-Sent Events); 429 past the per-client limit",
            response_class=StreamingResponse)
async def stream(request: Request):
    state = state_of(request)
    try:
        live = state.live.open(_client(request))
    except TooManyStreams as e:
        return error_response(request.url.path, 429, str(e), code="too_many_live_streams")
    worker = state.live_worker

    async def events():
        try:
            yield sse("ready", {"stream": live.id, **settings(state)})
            while True:
                try:
                    yield await asyncio.wait_for(live.events.get(), PING_SECONDS)
                except TimeoutError:
                    yield ": ping\n\n"
        finally:   # the page went away (starlette cancels us) or the server stops
            state.live.close(live, lambda job: worker.cancel(job, DISCONNECTED))

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.post("/{stream_id}", status_code=202, summary="Ask for the stream's next image; older ones are cancelled")
async def submit(stream_id: str, params: LiveParams, request: Request):
    state = state_of(request)
    live = state.live.get(stream_id)
    if live is None:
        return error_response(request.url.path, 404, f"no live stream {stream_id!r} is open", code="no_stream")
    worker = state.live_worker
    config = state.live.config
    loras = state.live_loras
    req = GenerationRequest(prompt=params.prompt, negative_prompt=params.negative_prompt, seed=params.seed,
                            steps=params.steps, cfg=params.cfg_scale, sampler=params.sampler_name,
                            width=params.width, height=params.height, loras=loras)
    try:
        live.check(params.seq)                    # before the work of resolving, too
        resolved = await state.prepare(worker, req, state.live_defaults)   # 4xx: the older job goes on
        live.accept(params.seq)                   # again after the await: a newer one may have come
    except StaleRequest as e:
        return error_response(request.url.path, 409, str(e), code="stale")
    if state.live.get(stream_id) is None:         # the page left during the await
        return error_response(request.url.path, 404, f"no live stream {stream_id!r} is open", code="no_stream")
    if live.job is not None:
        worker.cancel(live.job, SUPERSEDED)       # latest wins: dropped if queued, stopped if running
        live.job = None
    job = worker.submit(resolved, save=False)     # QueueFull: 429 with Retry-After, as every route
    live.job = job
    state.live.track(asyncio.create_task(_deliver(state, live, job, params.seq, config.keep)))
    return {"seq": params.seq, "stream": live.id, "seed": resolved.seed}


async def _deliver(state: ServerState, live: LiveStream, job: Job, seq: int, keep: int) -> None:
    """Wait for the job and push its image (or its failure) to the stream, unless superseded."""
    t0 = time.monotonic()
    try:
        result = await asyncio.wrap_future(job.future)
    except (Cancelled, asyncio.CancelledError):
        return                                    # superseded, disconnected or stopping: nothing to say
    except Exception as e:                        # a valid request that failed: the page shows the line
        if seq > live.shown_seq:
            live.events.put_nowait(_failed(seq, 500, f"internal error: {type(e).__name__}: {e}"))
        return
    image, record = result.images[0], result.records[0]
    data = await state.offload(png_bytes, image, record)
    event = {"seq": seq, "png": to_base64(data), "parameters": record.to_parameters(),
             "record": {"prompt": record.prompt, "negative_prompt": record.negative_prompt, "seed": record.seed,
                        "steps": record.steps, "sampler": record.sampler, "cfg": record.cfg,
                        "width": record.width, "height": record.height, "model_name": record.model_name},
             "seconds": round(result.seconds, 4), "waited": round(time.monotonic() - t0, 4)}
    live.push_image(seq, sse("image", event), image, record, keep)


def _failed(seq: int, status: int, detail: str) -> str:
    return sse("failed", {"seq": seq, "status": status, "detail": detail})


@router.post("/{stream_id}/keep", summary="Keep one of the stream's recent images in the gallery (outputs)")
async def keep(stream_id: str, params: KeepParams, request: Request) -> dict:
    state = state_of(request)
    live = state.live.get(stream_id)
    if live is None:
        return error_response(request.url.path, 404, f"no live stream {stream_id!r} is open", code="no_stream")
    held = live.results.get(params.seq)
    if held is None:
        return error_response(request.url.path, 404, f"image {params.seq} is no longer held by this stream "
                                                     f"(the last {state.live.config.keep} are)", code="not_held")
    path = await state.offload(state.store.save, *held)
    return {"name": path.name, "url": f"/outputs/{path.name}"}
