"""Watching other processes from a test: their /proc state, and waiting (bounded) for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` every 20 ms; AssertionError naming `what` if it is still false after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc, or None when no such process exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


def parent_of(pid: int) -> int | None:
    stat = proc_stat(pid)
    return stat[1] if stat else None


def process_gone(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is None or stat[0] == "Z"  # a zombie has exited; only its exit status is left


def interrupt_after(cmd: list[str], requests_seen: Callable[[], int], at_least: int, sig: int = 2,
                    start_timeout: float = 60.0, exit_timeout: float = 40.0) -> tuple[int, str]:
    """Start `cmd`, wait (bounded) until the server has seen `at_least` requests, send `sig` (SIGINT by
    default) and return (exit status, output). The process is killed if it outlives the test."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + start_timeout
        while requests_seen() < at_least and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert requests_seen() >= at_least, f"the run never started sending: {proc.stdout.read() if proc.poll() is not None else ''}"
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=exit_timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output
