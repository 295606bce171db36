"""Starting the server: the options and the listening socket first (a bad option or a taken port
fails before a large model loads), then the model, then uvicorn."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ..inference.engine import pool_bytes
from ..inference.generate import Generator
from .app import create_app
from .options import ServeError, ServeOptions, check_port
from .worker import logger


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for the server (port 0 picks a free one); ServeError when the address is taken."""
    check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot resolve the host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def free_memory(device) -> int | None:
    """Bytes free on `device` now (None where it cannot be told)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_pool_fits(generator: Generator, settings: ServeOptions) -> None:
    """The KV-cache pool is allocated whole at start: refuse, with the sizes, one that memory cannot hold."""
    need = pool_bytes(generator, settings.max_batch, settings.max_model_len)
    free = free_memory(generator.model.device)
    if free is not None and need > 0.9 * free:
        raise ServeError(
            f"the KV cache for --max-batch {settings.max_batch} rows of --max-model-len "
            f"{settings.max_model_len or generator.context} tokens needs {need / 2**20:.0f} MiB, and "
            f"{free / 2**20:.0f} MiB are free; lower either"
        )


def header_deadline(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection whose next request's headers are not all in within
    `seconds` of its opening or of the last response. uvicorn itself times out only a keep-alive wait
    that sees no byte at all, and the app sees nothing before the headers are complete, so a client
    sending a header byte now and then would hold its connection forever."""

    class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm_header_deadline()

        def on_response_complete(self) -> None:
            self.arm_header_deadline()  # before uvicorn starts on a pipelined request, which is on time
            super().on_response_complete()

        def arm_header_deadline(self) -> None:
            waited_on = self.cycle  # uvicorn replaces it once the next request's headers are in

            def expire() -> None:
                if self.cycle is waited_on and not self.transport.is_closing():
                    self.transport.close()

            timer = getattr(self, "header_timer", None)
            if timer is not None:
                timer.cancel()
            self.header_timer = self.loop.call_later(seconds, expire)

    return HeaderDeadline


def uvicorn_config(
    app, port: int, read_timeout: float, host: str = "127.0.0.1", log_level: str = "info"
) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=header_deadline(read_timeout))


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    compile: bool = False,
    quantize: str = "none",
    log_level: str = "info",
    adapter: str | Path | None = None,
    adapters: Mapping[str, str | Path] | None = None,
    **options,
) -> None:
    """Load a model directory (with a LoRA `adapter` merged in, when given) and serve it until interrupted,
    with `adapters` (name -> peft directory) served beside it, chosen by a request's `model`; `options` are
    ServeOptions fields."""
    settings = ServeOptions(**options)  # fail fast, before loading a large model
    sock = listen(host, port)
    try:
        generator = Generator.load(model_dir, compile=compile, quantize=quantize, adapter=adapter)
        if adapters:
            generator.add_adapters(adapters, max_rows=settings.max_batch)
        check_pool_fits(generator, settings)
        name = model_name or Path(model_dir).resolve().name
        app = create_app(generator, name, settings)
        bound_port = sock.getsockname()[1]
        config = uvicorn_config(app, bound_port, settings.read_timeout, host, log_level)  # configures logging
        shown = f"[{host}]" if ":" in host else host
        logger.info("serving %s on http://%s:%d/v1 (Press CTRL+C to quit)", name, shown, bound_port)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
