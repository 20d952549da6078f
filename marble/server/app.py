"""The FastAPI application: the OpenAI Images API, the A1111 API subset and the web UI on one app.

The edges only parse and translate: validation is the request's own (marble.request.resolve) plus
this server's limits (ServerState.prepare), generation is the pipeline's, run by one Worker thread
per loaded model. The shared state lives in state.py, which the routers import; only the CLI
imports this module.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from marble import __version__
from marble.errors import LoraError
from marble.pipeline import Pipeline, load_pipeline
from marble.request import RequestError
from marble.server import a1111_api, controlnet_api, live_api, openai_api, ui
from marble.server.auth import ApiKeyAuth
from marble.server.errors import error_response, is_openai_path, responder
from marble.server.limits import BodySizeLimit
from marble.server.state import ModelNotFound, ServerConfig, ServerState
from marble.server.worker import STOPPING, Cancelled, QueueFull

log = logging.getLogger("marble.server")


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line from pydantic's errors (never echoing the input, which may be huge)."""
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
            continue
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(request.url.path, 400, str(exc))

    @app.exception_handler(LoraError)
    async def _lora_error(request: Request, exc: LoraError):
        return error_response(request.url.path, 400, str(exc), code="lora_error", param="prompt")

    @app.exception_handler(ModelNotFound)
    async def _model_not_found(request: Request, exc: ModelNotFound):
        return error_response(request.url.path, 404, str(exc.args[0]), code="model_not_found", param="model")

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        return error_response(request.url.path, 429, str(exc), code="queue_full",
                              headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, exc: Cancelled):
        if exc.reason == STOPPING:
            return error_response(request.url.path, 503, "the server is stopping", code="stopping")
        return error_response(request.url.path, 409, f"the job was cancelled ({exc.reason})", code=exc.reason)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(list(exc.errors()))
        path = request.url.path
        if is_openai_path(path):           # OpenAI answers every invalid request with 400
            return error_response(path, 400, message, param=param)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return error_response(path, 422, message, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(request.url.path, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}")


def create_app(pipes: list[Pipeline], config: ServerConfig | None = None, *, load=None,
               live_pipe: Pipeline | None = None) -> FastAPI:
    """The whole server for already-loaded pipelines (the first is the default model); `load`
    (path -> Pipeline) loads a model of `config.models_dir` when a client switches to it;
    `live_pipe`: a few-step model for the live mode (default: the first model, at config.live's settings)."""
    config = config or ServerConfig()
    state = ServerState(pipes, config, load or load_pipeline, live_pipe=live_pipe)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="marble", version=__version__, lifespan=lifespan,
                  description="Text-to-image latent diffusion: the OpenAI Images API, an A1111 API subset "
                              "and a web UI. See docs/server.md.")
    app.state.marble = state
    _install_error_handlers(app)

    @app.get("/health", tags=["server"])
    async def health() -> dict:
        """Liveness and queue depth; the one route that never needs the API key."""
        return {"status": "ok", "version": __version__,
                "models": {name: {"hash": w.pipe.loaded.hash, "waiting": w.waiting(), "max_queue": w.max_queue}
                           for name, w in state.workers.items()}}

    app.include_router(openai_api.router)
    app.include_router(a1111_api.router)
    app.include_router(controlnet_api.router)
    app.include_router(ui.router)
    app.include_router(live_api.router)
    # added last = outermost: the key is checked before any body is read
    app.add_middleware(BodySizeLimit, max_bytes=config.limits.max_body_bytes, respond=responder)
    if config.api_key:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key, respond=responder)
    return app
