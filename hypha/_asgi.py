"""Serving a small hand-written ASGI app with hypercorn on trio, on a socket we bound ourselves.

Used by the job bridge (a 0600 Unix socket) and the metrics endpoint (a local TCP port).
NOTE: ``hypercorn.trio.serve()`` takes only a bind string; the ``worker_serve()`` it wraps takes
ready sockets, which keeps the binding (its mode, port 0's real port) in our hands.
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

__all__ = ["answer_lifespan", "serve_asgi"]


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Acknowledge the ASGI lifespan protocol (the apps here need no start-up or shut-down)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve_asgi(app: Any, sock: socket.socket, *, log: logging.Logger,
                     keep_alive_timeout: float | None = None,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on the bound, listening ``sock`` until cancelled."""
    config = Config()
    config.errorlog = log
    config.accesslog = None
    config.include_server_header = False
    if keep_alive_timeout is not None:
        config.keep_alive_timeout = keep_alive_timeout
    wrapped = wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi")
    sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(worker_serve, wrapped, config, sockets=sockets))
        task_status.started()
