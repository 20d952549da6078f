"""Live mode: images as you type. Each open page holds one stream; its requests replace each other.

A page opens a Server-Sent Events stream (live_api.py) and then posts a request, numbered by a
sequence number `seq` that only grows, after every change of the prompt or settings. "Latest
wins" per stream: a newer request cancels the stream's older job (dropped from the queue if it
waits, stopped at its next sampler step if it runs), and a result is pushed only if its seq is
newer than the last one pushed, so the page never receives an older image after a newer one.

Live images are not written to the outputs folder; the last few of each stream are held in
memory until the user keeps one. The number of open streams is limited per client address.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from marble.adapters.lora_loader import LoraSpec
from marble.errors import LoraError
from marble.record import GenerationRecord
from marble.request import GenerationRequest, ModelDefaults, RequestError, resolve

# the stand-in fast setting while no few-step model is given: the model itself at 4 steps of a
# second-order solver, without CFG (one network call a step instead of two)
FAST_STEPS, FAST_SAMPLER, FAST_CFG = 4, "DPM++ 2M", 1.0


@dataclass(frozen=True)
class LiveConfig:
    steps: int | None = None          # steps of a live image; None: the live model's own default, or FAST_STEPS
    sampler: str | None = None        # None: the live model's own default, or FAST_SAMPLER
    cfg: float | None = None          # None: the live model's own default, or FAST_CFG (no guidance)
    own_model: bool = False           # the live model is a separate few-step file: its defaults are its card's
    lora: Path | None = None          # a LoRA file (e.g. an LCM-LoRA) applied to every live request
    lora_weight: float = 1.0
    streams_per_client: int = 2       # open live streams one client address may hold; past that: 429
    debounce_ms: int = 100            # the page waits this long after the last change before it asks
    keep: int = 8                     # recent results held per stream, for "keep in the gallery"

    def __post_init__(self) -> None:
        if not isinstance(self.streams_per_client, int) or self.streams_per_client < 1:
            raise ValueError(f"the live streams per client must be >= 1, got {self.streams_per_client}")
        if not isinstance(self.debounce_ms, int) or not 0 <= self.debounce_ms <= 10_000:
            raise ValueError(f"the live debounce must be in 0..10000 ms, got {self.debounce_ms}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")

    def defaults(self, model: ModelDefaults) -> ModelDefaults:
        """What a live request falls back to: these settings, else the few-step model's own
        (the card's, from its config), else the stand-in fast setting."""
        def pick(given, own, fast):
            return given if given is not None else (own if self.own_model else fast)
        return replace(model, steps=pick(self.steps, model.steps, FAST_STEPS),
                       sampler=pick(self.sampler, model.sampler, FAST_SAMPLER),
                       cfg=float(pick(self.cfg, model.cfg, FAST_CFG)))


    @property
    def loras(self) -> tuple[LoraSpec, ...]:
        """The LoRA every live request carries (a path the operator gave, not a prompt tag)."""
        if self.lora is None:
            return ()
        return (LoraSpec(str(self.lora), self.lora_weight, self.lora_weight, is_path=True),)


def check_live(pipe, config: LiveConfig) -> None:
    """Try the live settings and LoRA on the live model once, at start: ValueError (one line)."""
    try:
        resolved = resolve(GenerationRequest(prompt="", loras=config.loras), config.defaults(pipe.defaults))
        pipe.lora_uses(resolved)
    except (RequestError, LoraError) as e:
        raise ValueError(f"the live settings: {e}") from None


class TooManyStreams(Exception):
    pass


class StaleRequest(Exception):
    pass


def sse(event: str, data: dict) -> str:
    """One Server-Sent Event (the data is one JSON line, so it needs no escaping of newlines)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(eq=False)
class LiveStream:
    client: str                                       # the client's address, for the per-client limit
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)   # SSE text, sent in order
    last_seq: int = -1                                # the newest request accepted
    shown_seq: int = -1                               # the newest image pushed
    job: object | None = None                         # the worker Job of the newest request
    results: OrderedDict = field(default_factory=OrderedDict)      # seq -> (image, record), newest last

    def check(self, seq: int) -> None:
        """StaleRequest unless `seq` is newer than every request this stream accepted."""
        if seq <= self.last_seq:
            raise StaleRequest(f"request {seq} is not newer than this stream's request {self.last_seq}")

    def accept(self, seq: int) -> None:
        """Claim `seq` as the newest request, or StaleRequest if a newer one came first."""
        self.check(seq)
        self.last_seq = seq

    def push_image(self, seq: int, event: str, image: Image.Image, record: GenerationRecord, keep: int) -> bool:
        """Queue an image event unless a newer one was pushed already: never older after newer."""
        if seq <= self.shown_seq:
            return False
        self.shown_seq = seq
        self.results[seq] = (image, record)
        while len(self.results) > keep:
            self.results.popitem(last=False)
        self.events.put_nowait(event)
        return True


class LiveHub:
    """The open live streams, by id, with the count per client address."""

    def __init__(self, config: LiveConfig):
        self.config = config
        self.streams: dict[str, LiveStream] = {}
        self.tasks: set[asyncio.Task] = set()         # deliveries in flight (held so they are not collected)

    def open(self, client: str) -> LiveStream:
        held = sum(1 for s in self.streams.values() if s.client == client)
        if held >= self.config.streams_per_client:
            raise TooManyStreams(f"this client already has {held} live streams open, the server's limit per "
                                 f"client (--live-streams-per-client); close one first")
        stream = LiveStream(client)
        self.streams[stream.id] = stream
        return stream

    def close(self, stream: LiveStream, cancel) -> None:
        """Forget the stream and cancel its job (`cancel(job)`), freeing its place in the queue."""
        self.streams.pop(stream.id, None)
        if stream.job is not None:
            cancel(stream.job)
        stream.results.clear()

    def get(self, stream_id: str) -> LiveStream | None:
        return self.streams.get(stream_id)

    def track(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
