"""Worker processes on this host, behind a small channel interface.

The dispatcher sees `send(worker, message)`, `broadcast(message)`,
`poll(timeout)` and `dead()`; how workers are hosted (local processes here,
a Ray actor pool later) stays in this module.

Processes are started with the `forkserver` context (or `spawn` where it does
not exist): never a plain fork of a process that already runs threads (the
scraper, queue feeders). SIGINT is ignored while they start, so a Ctrl-C
during start-up cannot kill a half-started worker; the workers ignore it for
good, the main process owns Ctrl-C.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
from typing import Any

from servescope.harness.worker import WorkerSettings, worker_main


def worker_context() -> mp.context.BaseContext:
    """The multiprocessing context worker processes start from (local pools and Ray-hosted workers alike)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["servescope.harness.worker", "servescope.harness.client"])
        return ctx
    return mp.get_context("spawn")


class LocalWorkerPool:
    """`count` worker processes, one inbox each, one shared outbox."""

    def __init__(self, count: int, settings: list[WorkerSettings]) -> None:
        if count < 1 or len(settings) != count:
            raise ValueError(f"need one WorkerSettings per worker, got {len(settings)} for {count}")
        ctx = worker_context()
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(count)]
        self.processes = [
            ctx.Process(target=worker_main, args=(i, self.inboxes[i], self.outbox, settings[i]),
                        name=f"servescope-worker-{i}", daemon=True)
            for i in range(count)
        ]
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            for process in self.processes:
                process.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def __len__(self) -> int:
        return len(self.processes)

    def send(self, worker: int, message: Any) -> None:
        self.inboxes[worker].put(message)

    def broadcast(self, message: Any) -> None:
        for inbox in self.inboxes:
            inbox.put(message)

    def poll(self, timeout: float) -> list[Any]:
        """Messages from the workers: waits up to `timeout` for the first, then takes what is there."""
        messages = []
        try:
            messages.append(self.outbox.get(timeout=timeout))
            while True:
                messages.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        return messages

    def dead(self) -> list[int]:
        """Workers whose process has exited (normally or not)."""
        return [i for i, p in enumerate(self.processes) if not p.is_alive()]

    def close(self, timeout: float = 5.0) -> None:
        for process in self.processes:
            process.join(timeout=timeout)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=1.0)
        for q in (*self.inboxes, self.outbox):
            q.cancel_join_thread()
            q.close()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
