"""Per-server limits: an extra layer on top of the request's own validation (marble.request).

The request dataclass says what marble can do at all; these say what this server agrees to do
for one caller (a public server wants far less than the model's maximum). The body-size cap is an
ASGI middleware so that an oversize upload is refused before anything parses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from marble.hires import hires_size
from marble.request import RequestError, ResolvedRequest

MiB = 1024 * 1024


class LimitError(RequestError):
    """A request that is valid for marble but over this server's limits."""


@dataclass(frozen=True)
class ServerLimits:
    max_pixels: int = 1024 * 1024          # width·height of one output image
    max_steps: int = 150                   # sampler steps per image
    max_n: int = 8                         # images per request (A1111: batch_size · n_iter)
    max_prompt_chars: int = 4000           # each of prompt and negative prompt
    max_input_pixels: int = 4096 * 4096    # a decoded init image or mask, before any resize
    max_body_bytes: int = 32 * MiB         # a whole request body: JSON with base64 images, or multipart

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_steps", "max_n", "max_prompt_chars", "max_input_pixels", "max_body_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


def check_limits(request: ResolvedRequest, limits: ServerLimits) -> None:
    """Raise LimitError if a resolved request asks for more than this server allows."""
    for label, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise LimitError(f"the {label} is {len(text)} characters; this server's limit is {limits.max_prompt_chars}")
    if request.steps > limits.max_steps:
        raise LimitError(f"steps {request.steps} is over this server's limit of {limits.max_steps}")
    if request.n > limits.max_n:
        raise LimitError(f"{request.n} images is over this server's limit of {limits.max_n} per request")
    if request.width * request.height > limits.max_pixels:
        raise LimitError(f"size {request.width}x{request.height} is over this server's limit of "
                         f"{limits.max_pixels} pixels")
    if request.hires is not None:
        h = request.hires
        size = hires_size(request.width, request.height, scale=h.scale, resize_x=h.resize_x, resize_y=h.resize_y,
                          factor=1)
        if size.width * size.height > limits.max_pixels:
            raise LimitError(f"the hires size {size.width}x{size.height} is over this server's limit of "
                             f"{limits.max_pixels} pixels")
        if h.steps > limits.max_steps:
            raise LimitError(f"hires steps {h.steps} is over this server's limit of {limits.max_steps}")


ErrorResponder = Callable[[str, int, str], Callable]   # (path, status, message) -> an ASGI response


class BodySizeLimit:
    """ASGI middleware: buffer each request body up to `max_bytes` and answer 413 past it.

    Buffering (rather than counting while the app reads) lets the refusal happen before any
    parser runs, whether or not the client sent Content-Length. After the body is replayed,
    later receive() calls reach the server, so disconnects are still seen.
    """

    def __init__(self, app, max_bytes: int, respond: ErrorResponder):
        self.app, self.max_bytes, self.respond = app, max_bytes, respond

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        too_big = f"the request body is over this server's limit of {self.max_bytes} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.respond(path, 413, too_big)(scope, receive, send)

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return                                   # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.respond(path, 413, too_big)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
