"""Run an ASGI app with uvicorn on a free loopback port, in a thread, for the test session."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

START_TIMEOUT_S = 10.0
# Providers' edges keep an idle connection open far longer than a client's pool does (httpx drops it after 5 s).
# Uvicorn's 5 s default races the client on a busy machine: a request sent as the server closes the socket fails
# unsent, and the job is charged that call's worst case for a call nobody billed.
KEEP_ALIVE_S = 75


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadedServer:
    def __init__(self, app, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                timeout_keep_alive=KEEP_ALIVE_S)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"emulator on {self.url} did not start in {START_TIMEOUT_S}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT_S)
