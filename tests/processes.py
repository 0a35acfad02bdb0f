"""Start and stop the real Prefect CLI processes a test needs: by PID, with bounded waits."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10.0


def prefect_bin() -> str:
    return str(Path(os.sys.executable).parent / "prefect")


class Background:
    """A process in its own session, so stopping it stops its children (flow runs) too."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._handle = open(log, "wb")
        self.proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=self._handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_GRACE_S)
        self._handle.close()


def wait_healthy(api_url: str, server: Background, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {server.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout_s}s: {server.log.read_text()[-2000:]}")


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([prefect_bin(), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
