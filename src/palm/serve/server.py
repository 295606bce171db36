"""Starting the server: the listening socket first (a taken port fails before a large model loads),
then the model, then uvicorn."""

from __future__ import annotations

import socket
from pathlib import Path

import uvicorn

from ..errors import PalmError
from ..generate import Generator
from .app import create_app
from .worker import logger


class ServeError(PalmError):
    """The server cannot start: the address is in use, a bad setting."""


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for the server (port 0 picks a free one); ServeError when the address is taken."""
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


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_tokens_limit: int = 512,
          max_body_bytes: int = 1_000_000, max_batch: int = 8, model_name: str | None = None,
          compile: bool = False, log_level: str = "info") -> None:
    """Load a model directory and serve it until interrupted."""
    if max_tokens_limit < 1 or max_body_bytes < 1 or max_batch < 1:
        raise ServeError("max_tokens_limit, max_body_bytes and max_batch must be positive")
    sock = listen(host, port)  # fail fast, before loading a large model
    try:
        generator = Generator.load(model_dir, compile=compile)
        name = model_name or Path(model_dir).resolve().name
        app = create_app(generator, name, max_tokens_limit, max_body_bytes, max_batch)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(app, host=host, port=bound_port, log_level=log_level)  # configures logging
        shown = f"[{host}]" if ":" in host else host
        logger.info("serving %s on http://%s:%d/v1 (Press CTRL+C to quit)", name, shown, bound_port)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
