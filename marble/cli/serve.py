"""`marble serve`: the HTTP server (OpenAI Images API, A1111 API subset, web UI). See docs/server.md."""
from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from marble.cli.app import app, fail, info, warn
from marble.cli.compute import apply_threads, dtype_option, read_dtype, threads_option, trace_option

MB = 1024 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_live_model(first: str) -> str | None:
    """The distilled few-step built-in model ('builtin-lcm'), when it ships beside the built-in one
    being served."""
    from marble.checkpoints.resolve import models_dir
    return "builtin-lcm" if first == "builtin" and (models_dir() / "builtin-lcm.safetensors").is_file() else None


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; loopback unless told otherwise (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, "--port", help="TCP port (0: any free port, printed at start)."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="A model to load: 'builtin' (default), 'tiny-random' or a .safetensors file. Repeat for several; the first is the default. One worker per model."),
    max_queue: int = typer.Option(8, "--max-queue", help="Requests that may wait behind the running one, per model; past that: 429 with Retry-After."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MARBLE_API_KEY", help="Require this key on every route but /health (Bearer, Basic password or X-API-Key). Also read from $MARBLE_API_KEY."),
    outputs: Path = typer.Option(Path("outputs"), "--outputs", help="Folder where every generated PNG is saved with its record."),
    max_pixels: int = typer.Option(1024 * 1024, "--max-pixels", help="Largest width·height per image a request may ask for."),
    max_steps: int = typer.Option(150, "--max-steps", help="Most sampler steps a request may ask for."),
    max_n: int = typer.Option(8, "--max-n", help="Most images per request."),
    max_prompt_chars: int = typer.Option(4000, "--max-prompt-chars", help="Longest prompt (and negative prompt), in characters."),
    max_upload_mb: int = typer.Option(32, "--max-upload-mb", help="Largest request body in MiB (uploads, base64 images)."),
    lora_dir: Optional[Path] = typer.Option(None, "--lora-dir", help="Folder where <lora:NAME> prompt tags are looked up (names never resolve outside it; GET /sdapi/v1/loras lists it). Default: $MARBLE_LORA_DIR, else models/lora."),
    lora_lenient: bool = typer.Option(False, "--lora-lenient", help="Skip (with a warning) the layers of a LoRA file a model lacks, instead of refusing the request."),
    controlnet_dir: Optional[Path] = typer.Option(None, "--controlnet-dir", help="Folder of ControlNets that requests name (GET /controlnet/model_list lists it; names never resolve outside it). Default: $MARBLE_CONTROLNET_DIR, else models/controlnet."),
    max_control_units: int = typer.Option(3, "--max-control-units", help="Most ControlNet units per request."),
    preview_decoder: Optional[Path] = typer.Option(None, "--preview-decoder", help="A TAESD file (diffusers AutoencoderTiny or taesd_decoder.safetensors) that draws step previews. Default: a linear latent-to-RGB map (the VAE where none is known). docs/few-step.md."),
    decoder: Optional[Path] = typer.Option(None, "--decoder", help="A TAESD file that decodes the final images instead of the VAE: faster, softer. Recorded as the image's VAE."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Approximation: 'int8' runs the served models' U-Net transformer Linear layers in dynamic int8 (not with LoRAs; docs/bench.md). Default: off."),
    weights: Optional[str] = typer.Option(None, "--weights", envvar="MARBLE_WEIGHTS", help="Keep the weights in fp16 or bf16 (half the memory) and compute in float32; fp32 (default). Also $MARBLE_WEIGHTS."),
    low_memory: bool = typer.Option(False, "--low-memory", envvar="MARBLE_LOW_MEMORY", help="Keep the weights that a .safetensors model stores in the dtype they are kept in (an fp16 file with --weights fp16) as read-only views of the file's memory map, and hand each network's pages back to the kernel when its stage ends (the U-Net's before each VAE decode): lower peak memory, the same pixels (not recorded: it cannot change them), a page re-read from the page cache per use. The file must not be rewritten in place while it is served. docs/bench.md. Also $MARBLE_LOW_MEMORY."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Folder of checkpoints (SD1.x, SD2.x, SDXL .safetensors files, diffusers folders, marble files) that clients may list (/sdapi/v1/sd-models) and switch to (sd_model_checkpoint, OpenAI 'model'). Default: $MARBLE_MODELS, else models/."),
    live_model: Optional[str] = typer.Option(None, "--live-model", help="A few-step model for the live mode (as you type in the web UI); its file's own default steps, sampler and CFG are the live settings. Default: models/builtin-lcm.safetensors when it exists and the first model is the built-in one, else the first model at --live-steps 4, DPM++ 2M, CFG 1."),
    live_lora: Optional[Path] = typer.Option(None, "--live-lora", help="A LoRA file (e.g. an LCM-LoRA) applied to every live request."),
    live_steps: Optional[int] = typer.Option(None, "--live-steps", help="Steps of a live image (default: the live model's own, or 4)."),
    live_sampler: Optional[str] = typer.Option(None, "--live-sampler", help="Sampler of a live image (default: the live model's own, or DPM++ 2M)."),
    live_cfg: Optional[float] = typer.Option(None, "--live-cfg", help="CFG of a live image (default: the live model's own, or 1: no guidance, one network call a step)."),
    live_debounce_ms: int = typer.Option(100, "--live-debounce-ms", help="The web page asks for a live image this long after the last change."),
    live_streams_per_client: int = typer.Option(2, "--live-streams-per-client", help="Live streams one client address may hold open; past that: 429."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: critical, error, warning, info, debug."),
    threads: int = threads_option(),
    dtype: str = dtype_option(),
    trace: bool = trace_option(),
) -> None:
    """Serve the OpenAI Images API (/v1/images/...), the A1111 API (/sdapi/v1/...) and a web UI (/).

    Interactive API docs at /docs; /health never needs the key.
    """
    from marble.errors import ModelLoadError
    from marble.server.limits import ServerLimits

    if not 0 <= port <= 65535:
        fail(f"--port must be in 0..65535, got {port}")
    if max_control_units < 0:
        fail(f"--max-control-units must be >= 0, got {max_control_units}")
    if max_queue < 0:
        fail(f"--max-queue must be >= 0, got {max_queue}")
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        fail(f"--log-level must be one of critical, error, warning, info, debug; got {log_level!r}")
    if api_key is not None and not api_key.strip():
        fail("--api-key is empty")
    for flag, value in (("--max-pixels", max_pixels), ("--max-steps", max_steps), ("--max-n", max_n),
                        ("--max-prompt-chars", max_prompt_chars), ("--max-upload-mb", max_upload_mb)):
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    limits = ServerLimits(max_pixels=max_pixels, max_steps=max_steps, max_n=max_n,
                          max_prompt_chars=max_prompt_chars, max_body_bytes=max_upload_mb * MB)
    from marble.server.live import LiveConfig
    try:
        live = LiveConfig(steps=live_steps, sampler=live_sampler, cfg=live_cfg, lora=live_lora,
                          streams_per_client=live_streams_per_client, debounce_ms=live_debounce_ms)
    except ValueError as e:
        fail(str(e))
    if outputs.exists() and not outputs.is_dir():
        fail(f"--outputs {outputs} exists and is not a folder")

    from marble.cli.generate import check_mapped, read_quantize, read_weights
    quantize = read_quantize(quantize)
    # int8 kernels take float32 activations: auto means fp32 with --quantize
    compute_dtype = read_dtype("fp32" if dtype == "auto" and quantize else dtype)
    apply_threads(threads)
    storage = read_weights(weights)
    specs = model or ["builtin"]
    if len(set(specs)) != len(specs):
        fail("the same --model is given twice")

    from marble.server.thread import listen
    try:
        sock = listen(host, port)     # before loading models: a taken port fails fast
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")

    from marble.pipeline import load_pipeline
    pipes = []
    for spec in specs:
        try:
            pipes.append(load_pipeline(spec, compute_dtype, lora_dir=lora_dir, lora_lenient=lora_lenient,
                                       preview_decoder=preview_decoder, decoder=decoder, trace=trace,
                                       storage=storage, control_dir=controlnet_dir,
                                       max_control_units=max_control_units, quantize=quantize,
                                       mapped=low_memory))
            if low_memory:
                check_mapped(pipes[-1])
        except ModelLoadError as e:
            sock.close()
            fail(str(e))
    names = [p.name for p in pipes]
    if len(set(names)) != len(names):
        sock.close()
        fail(f"two models have the same name ({', '.join(names)}); rename a file")
    live_spec = live_model or default_live_model(specs[0])
    live_pipe = None
    if live_spec in specs:
        live_pipe, live = pipes[specs.index(live_spec)], replace(live, own_model=True)
    elif live_spec is not None:
        try:
            live_pipe = load_pipeline(live_spec, lora_dir=lora_dir, lora_lenient=lora_lenient)
        except ModelLoadError as e:
            sock.close()
            fail(f"--live-model: {e}")
        live = replace(live, own_model=True)
    from marble.server.live import check_live
    try:
        check_live(live_pipe or pipes[0], live)   # the settings and the LoRA, tried once before serving
    except ValueError as e:
        sock.close()
        fail(str(e))

    import uvicorn
    from marble.server.app import create_app
    from marble.server.state import ServerConfig

    from marble.checkpoints.resolve import models_dir as default_models_dir
    folder = models_dir or default_models_dir()
    if models_dir is not None and not models_dir.is_dir():
        sock.close()
        fail(f"--models-dir {models_dir} is not a folder")
    application = create_app(pipes, ServerConfig(outputs=outputs, max_queue=max_queue, api_key=api_key, limits=limits,
                                                 models_dir=folder, live=live),
                             load=lambda path: load_pipeline(path, lora_dir=lora_dir, lora_lenient=lora_lenient,
                                                             storage=storage, control_dir=controlnet_dir,
                                                             max_control_units=max_control_units, quantize=quantize,
                                                             mapped=low_memory),
                             live_pipe=live_pipe)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if not is_loopback(host) and not api_key:
        warn(f"serving on {host} with no --api-key: anyone who can reach this machine can use it")
    info(f"marble: serving {', '.join(names)} on http://{shown}:{bound_port}  (web UI /, API docs /docs, "
         f"outputs in {outputs})")
    d = live.defaults((live_pipe or pipes[0]).defaults)
    info(f"marble: live mode with {(live_pipe or pipes[0]).name}: {d.steps} steps, {d.sampler}, CFG {d.cfg:g}"
         + (f", LoRA {live.lora}" if live.lora else ""))
    # on Ctrl-C, requests still waiting after 5 s are cancelled (their jobs stop at the next step)
    server = uvicorn.Server(uvicorn.Config(application, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
