"""What every route shares: the server's config, the loaded models with their workers, the outputs.

The routers (openai_api, a1111_api, ui) import this module; app.py imports the routers and builds
the app around one ServerState, so no router imports the app.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import Request

from marble.errors import ModelLoadError
from marble.pipeline import Pipeline, load_pipeline
from marble.request import GenerationRequest, ModelDefaults, RequestError, ResolvedRequest, resolve
from marble.server.catalog import CatalogEntry, ModelCatalog
from marble.server.limits import ServerLimits, check_limits
from marble.server.live import LiveConfig, LiveHub
from marble.server.outputs import OutputStore
from marble.server.worker import JobResult, Worker, wait_for


@dataclass(frozen=True)
class ServerConfig:
    outputs: Path = Path("outputs")      # every generated PNG is saved here, numbered
    max_queue: int = 8                   # jobs that may wait behind the running one, per model
    api_key: str | None = None           # when set, every route but /health requires it
    limits: ServerLimits = field(default_factory=ServerLimits)
    preview_interval: float = 0.5        # seconds between progress previews (each a VAE decode)
    io_threads: int = 2                  # a fixed pool that decodes uploads and reads files (CPU work: ~cores)
    models_dir: Path | None = None       # checkpoints a client may switch the default model to (None: none)
    live: LiveConfig = field(default_factory=LiveConfig)   # the live mode's model settings and limits


class ModelNotFound(LookupError):
    pass


class ServerState:
    """The loaded models, their workers and the outputs folder, shared by every route.

    Switching (A1111's sd_model_checkpoint, OpenAI's `model`) to a model of the models folder
    that is not loaded replaces the default model: the new one is loaded off the event loop, takes
    the default worker's place, and the old worker finishes the jobs already queued on it and is
    dropped. Each model object still serves one request at a time, in its own worker."""

    def __init__(self, pipes: list[Pipeline], config: ServerConfig, load: Callable[[str], Pipeline] = load_pipeline,
                 live_pipe: Pipeline | None = None):
        if not pipes:
            raise ValueError("the server needs at least one model")
        names = [p.name for p in pipes]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a name: {', '.join(names)}")
        self.config = config
        self.limits = config.limits
        self.store = OutputStore(config.outputs)
        self.workers = {p.name: Worker(p, self.store, config.max_queue, config.preview_interval) for p in pipes}
        self.default = names[0]
        self._pool: ThreadPoolExecutor | None = None
        self.catalog = ModelCatalog(config.models_dir)
        self._load = load                     # path -> Pipeline (serve passes its LoRA folder)
        self._switching: asyncio.Lock | None = None
        self._started = False

        # live mode: a few-step model of its own (one more worker), else the default model's worker
        self.live = LiveHub(config.live)
        if live_pipe is None or any(live_pipe is p for p in pipes):   # one worker per model, never two
            self.live_worker = self.workers[live_pipe.name if live_pipe is not None else self.default]
        else:
            self.live_worker = Worker(live_pipe, self.store, config.max_queue, config.preview_interval)
        self.live_defaults = config.live.defaults(self.live_worker.pipe.defaults)
        self.live_loras = config.live.loras

    def _all_workers(self) -> list[Worker]:
        return list(self.workers.values()) + ([self.live_worker] if self.live_worker not in self.workers.values()
                                              else [])

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.config.io_threads, thread_name_prefix="marble-io")
        self._started = True
        for worker in self._all_workers():
            worker.start()

    def stop(self) -> None:
        for worker in self._all_workers():
            worker.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def offload(self, fn, *args):
        """Run blocking work (image decoding, file reads) off the event loop, in the I/O pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def worker(self, name: str | None) -> Worker:
        """The worker for a model name (A1111 titles "name [hash]" too); None: the first model."""
        if not name:
            return self.workers[self.default]
        if name in self.workers:
            return self.workers[name]
        for worker in self.workers.values():
            if name == f"{worker.name} [{worker.pipe.loaded.hash}]":
                return worker
        raise ModelNotFound(f"the model {name!r} is not loaded here; this server has: {', '.join(self.workers)}")

    def hashes(self) -> dict[str, str]:
        return {name: w.pipe.loaded.hash for name, w in self.workers.items()}

    def _not_found(self, name: str) -> ModelNotFound:
        known = list(self.workers) + [e.name for e in self.catalog.entries() if e.name not in self.workers]
        return ModelNotFound(f"the model {name[:200]!r} is not loaded here; this server has: {', '.join(known)}")

    async def select(self, name: str | None) -> Worker:
        """The worker for a model a request names: a loaded one, or one of the models folder, which
        is loaded first and becomes the default (`switch`); ModelNotFound (404) for anything else."""
        if not name:
            return self.workers[self.default]
        try:
            return self.worker(name)
        except ModelNotFound:
            pass
        entry = self.catalog.find(name, self.hashes())
        if entry is None:
            raise self._not_found(name)
        return await self.switch(entry)

    async def switch(self, entry: CatalogEntry) -> Worker:
        """Make a models-folder entry the default model, loading it if no worker serves it yet."""
        if self._switching is None:
            self._switching = asyncio.Lock()
        async with self._switching:
            if entry.name in self.workers:
                self.default = entry.name
                return self.workers[entry.name]
            loop = asyncio.get_running_loop()
            try:   # a long, CPU-bound load: its own thread, so the I/O pool keeps serving
                pipe = await loop.run_in_executor(None, self._load, str(entry.path))
                await loop.run_in_executor(None, self.catalog.remember, entry)
            except ModelLoadError as e:
                raise RequestError(f"the model {entry.name} cannot be loaded: {e}") from None
            pipe.loaded.name = entry.name   # the name the listing gives it, whatever the file's metadata says
            worker = Worker(pipe, self.store, self.config.max_queue, self.config.preview_interval)
            old = self.workers.pop(self.default)
            self.workers = {worker.name: worker, **self.workers}
            self.default = worker.name
            if self._started:
                worker.start()
            if self.live_worker is old:   # the live mode followed the default model: it follows the switch
                self.live_worker = worker
                self.live_defaults = self.config.live.defaults(worker.pipe.defaults)
            await loop.run_in_executor(None, old.retire)   # its queued jobs finish on it, then it is dropped
            return worker

    async def prepare(self, worker: Worker, request: GenerationRequest,
                      defaults: ModelDefaults | None = None) -> ResolvedRequest:
        """Resolve (marble's own validation), check this server's limits, then read the prompt's
        LoRAs (names inside the model's LoRA folder only; off the event loop, cached after the first
        read): 4xx before queueing. `defaults`: other than the model's (the live settings)."""
        resolved = resolve(request, defaults or worker.pipe.defaults)
        check_limits(resolved, self.limits)
        if resolved.lora_specs:
            await self.offload(worker.pipe.lora_uses, resolved)
        if resolved.controls:   # ControlNets by name, inside the ControlNet folder only; fitted to the model
            try:
                await self.offload(worker.pipe.control_nets, resolved)
            except ModelLoadError as e:
                raise RequestError(str(e)) from None
        return resolved

    async def run(self, worker: Worker, resolved: ResolvedRequest, http_request: Request) -> JobResult:
        job = worker.submit(resolved)
        return await wait_for(worker, job, http_request.is_disconnected)


def state_of(request: Request) -> ServerState:
    return request.app.state.marble
