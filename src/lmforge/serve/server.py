"""`lmforge serve MODEL`: load a model and serve it with uvicorn until Ctrl-C or SIGTERM.

Shutdown is graceful: the server stops accepting connections, in-flight requests get
``shutdown_timeout_s`` seconds to finish, then whatever still runs is cancelled (streams end with an
error event, slots are freed) and the engine thread ends.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import threading

from ..config import ServeConfig, UserError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free port); a clear error when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"host: cannot resolve {host!r} ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(model: str, cfg: ServeConfig) -> int:
    import uvicorn

    from ..lm import LM
    from .api import create_app

    cfg.validate()
    if cfg.api_key is None and os.environ.get("LMFORGE_API_KEY"):
        cfg.api_key = os.environ["LMFORGE_API_KEY"]
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    lm = LM.load(model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
    app = create_app(lm, cfg)
    server_state = app.state.server
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lmforge serve: {server_state.name} at http://{shown}:{port}/ (chat page at /, OpenAI API at /v1, "
          f"docs at /docs); {cfg.max_batch} slots, context window {server_state.window} tokens", flush=True)
    if not _is_loopback(host) and cfg.api_key is None:
        print("warning: listening beyond this machine without --api-key: anyone who can reach it can use it",
              file=sys.stderr, flush=True)
    engine = server_state.engine

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # First tell the engine: running requests get shutdown_timeout_s to finish, then end with an
            # error event, so every client gets a well-formed answer before uvicorn closes connections.
            engine.drain(cfg.shutdown_timeout_s)
            await super().shutdown(sockets)

    # uvicorn's own limit is only a backstop behind the engine's.
    config = uvicorn.Config(app, log_level="info", access_log=cfg.access_log, lifespan="on",
                            timeout_graceful_shutdown=cfg.shutdown_timeout_s + 5)
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal into the
    # handler that was there before: make that a no-op, so a requested stop ends with status 0.
    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread()]
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("lmforge serve: stopped", flush=True)
    return 0
