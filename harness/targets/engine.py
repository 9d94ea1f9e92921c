"""Starting and stopping the bundled reference engine as a subprocess.

The harness never imports the engine (or torch): it runs
`python -m servescope.reference_engine --host 127.0.0.1 --port P ...` on a free port,
waits for `GET /health`, and talks to it over HTTP like any other target.
The engine gets its own session (process group), so the user's Ctrl-C stops
the load, not the server that in-flight requests are waiting on; the harness
stops it at the end (SIGINT, then SIGTERM, then SIGKILL). On Linux the engine
is also told to die with the harness (PR_SET_PDEATHSIG), so a harness killed
by a CI timeout or SIGKILL never leaves a model-sized orphan behind. With
`--engine-process` (the default) the server has a child of its own, the
engine process: the server stops and reaps it on SIGINT/SIGTERM, and it exits
by itself when the server is killed outright (end of file on its socket).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field

import httpx

HEALTH_TIMEOUT_S = 180.0  # a model load on CPU can take a while
STOP_TIMEOUT_S = 10.0
STDERR_TAIL_LINES = 40


class EngineError(RuntimeError):
    """The engine could not be started (the message carries the tail of its stderr)."""


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel to SIGTERM it when the harness dies.

    (The signal fires when the thread that started the engine exits: execute_run
    starts and stops the engine on one thread, so that is the end of the run.)
    """
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EngineProcess:
    """A running reference engine. Use as a context manager or call `stop()`."""

    preset: str | None = None
    extra_args: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    health_timeout_s: float = HEALTH_TIMEOUT_S
    process: subprocess.Popen | None = None
    _log: object | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "servescope.reference_engine", "--host", self.host, "--port", str(self.port)]
        if self.preset:
            args += ["--preset", self.preset]
        if not any(a == "--device" or a.startswith("--device=") for a in self.extra_args):
            args += ["--device", "auto"]  # the engine picks cuda when it has it; the harness never imports torch
        return args + list(self.extra_args)

    def start(self) -> "EngineProcess":
        # stderr goes to a file, not a pipe: a chatty engine must never block on a full pipe.
        self._log = tempfile.TemporaryFile(mode="w+b")
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=self._log, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise EngineError(
                        f"the reference engine exited with status {self.process.returncode} before it was ready.\n"
                        f"command: {' '.join(self.argv)}\n--- engine stderr (last lines) ---\n{self.stderr_tail()}"
                    )
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        tail = self.stderr_tail()
        self.stop()
        raise EngineError(
            f"the reference engine did not answer GET /health within {self.health_timeout_s:.0f}s.\n"
            f"command: {' '.join(self.argv)}\n--- engine stderr (last lines) ---\n{tail}"
        )

    def died(self) -> str | None:
        """Why the engine is gone, if it stopped on its own during the run."""
        if self.process is None or self.process.poll() is None:
            return None
        return f"the reference engine exited with status {self.process.returncode} during the run:\n{self.stderr_tail()}"

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        tail = deque(self._log.read().decode("utf-8", "replace").splitlines(), maxlen=lines)
        return "\n".join(tail)

    def stop(self) -> int | None:
        """SIGINT, then SIGTERM, then SIGKILL, each after a wait; returns the exit status."""
        if self.process is None:
            return None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            try:
                self.process.send_signal(sig)
                self.process.wait(timeout=STOP_TIMEOUT_S if sig != signal.SIGKILL else 5.0)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        return self.process.poll()

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "EngineProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict:
        return {"kind": "reference", "preset": self.preset, "argv": self.argv[1:], "base_url": self.base_url}
