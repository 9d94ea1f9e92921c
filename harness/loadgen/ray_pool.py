"""Worker processes as Ray actors: the same worker loop, client and transport, on a Ray cluster's nodes.

`RayWorkerPool` is a drop-in for `LocalWorkerPool` behind the dispatcher's
channel (`send`, `broadcast`, `poll`, `dead`, `close`). Each actor holds one
`harness.worker` loop in a thread of its own, fed through in-actor queues:

* the driver batches its messages per actor and hands them over on every
  poll (one `send` call per actor and poll at most; Ray runs one caller's
  calls to one actor group in order, so the order of messages holds);
* each actor always has one `drain` call outstanding, which returns as soon
  as the worker has something to say (or after `DRAIN_WAIT_S`), so records
  stream back batched, in bounded memory on both sides.

Clocks: a worker's times are differences on its own node's monotonic clock,
exact whatever the other nodes do. Run-relative times are mapped to the
driver's clock by giving each actor `clock_origin + offset` of its node,
where the offset comes from round trips (NTP-style: the sample with the
smallest round trip; its half-RTT is the uncertainty), measured before the
run and again during it (the drift). A node on the driver's own kernel (same
boot id: the same host, or a container on it) reads the very same
CLOCK_MONOTONIC: its offset is zero exactly, with no estimate.

Ray starts its worker processes niced (15 by default, so the raylet keeps
priority); the measuring process puts itself back at niceness 0, or says why
it could not.

Ray is imported only here, and this module only with `--ray`.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from servescope.errors import UsageError
from servescope.harness.worker import WorkerSettings, worker_main

DRAIN_WAIT_S = 0.05  # longest an idle actor holds a drain call before answering "nothing yet"
# Each Ray call costs the relay and the driver a fixed amount of CPU, so messages travel in batches:
# a drain that got its first message keeps collecting this long, and the driver sends a worker's
# queued messages at most this often (control messages, broadcast, go at once). Both stay far
# inside the slack the dispatcher keeps (closed-loop job buffers, open-loop send times 0.5 s ahead).
BATCH_S = 0.025
CLOCK_PINGS = 15  # round trips per node and measurement; the fastest one is kept
RESYNC_S = 10.0  # offsets are measured again this often during a run (drift)
ACTOR_START_TIMEOUT_S = 120.0


class RayClusterError(UsageError):
    """The cluster cannot be reached or cannot host the workers; the message carries Ray's own words."""


@dataclass
class NodeClock:
    """How a node's monotonic clock relates to the driver's: node_time = driver_time + offset_s."""

    node: str
    offset_s: float
    uncertainty_s: float  # half the round trip of the sample used
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (driver t, offset, half-RTT)
    same_kernel: bool = False  # the driver's own kernel: one clock, offset 0 exactly

    def describe(self) -> dict[str, Any]:
        first, last = self.samples[0], self.samples[-1]
        span = last[0] - first[0]
        drift = (last[1] - first[1]) / span if span > 0 else 0.0
        return {"node": self.node, "offset_s": self.offset_s, "uncertainty_s": self.uncertainty_s,
                "drift_s_per_s": drift, "measurements": len(self.samples), "same_kernel": self.same_kernel}


class WorkerActor:
    """Hosts one load-generator worker process on a Ray node and relays its messages.

    The worker runs in a process of its own, started exactly as a local worker is
    (harness.loadgen.pool), never in a thread of the actor: the actor's process
    also runs Ray's own threads, and the measuring loop must not share a GIL with
    them. The class is wrapped by `ray.remote` when the pool starts.
    """

    def __init__(self) -> None:
        from servescope.harness.loadgen.pool import worker_context

        self.ctx = worker_context()
        self.inbox, self.outbox = self.ctx.Queue(), self.ctx.Queue()  # made here: `drain` may run before `start`
        self.process: Any = None

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def clock(self) -> float:
        return time.perf_counter()

    def kernel(self) -> str | None:
        return boot_id()

    def start(self, index: int, settings: WorkerSettings) -> bool:
        self.process = self.ctx.Process(target=_worker_process, args=(index, self.inbox, self.outbox, settings),
                                   name=f"servescope-worker-{index}", daemon=True)
        self.process.start()
        return True

    def send(self, messages: list[Any]) -> None:
        for message in messages:
            self.inbox.put(message)

    def drain(self, wait_s: float) -> list[Any]:
        """What the worker said since the last drain: waits up to `wait_s` for the first message,
        then collects for BATCH_S more (one call carries a batch, not a message)."""
        out = []
        try:
            out.append(self.outbox.get(timeout=wait_s))
            until = time.monotonic() + BATCH_S
            while (left := until - time.monotonic()) > 0:
                out.append(self.outbox.get(timeout=left))
        except queue.Empty:
            pass
        if not out and self.process is not None and self.process.exitcode is not None:
            raise RuntimeError(f"the worker process exited (code {self.process.exitcode})")
        return out


def boot_id() -> str | None:
    """This kernel's boot id: processes that share it read one CLOCK_MONOTONIC (same host, or containers on it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


class _Pickled:
    """A queue end whose messages cross as pickled bytes, so the relaying actor never unpickles
    and re-pickles them: it moves bytes between the worker's queues and Ray, and only the two
    ends (the worker, the driver) pay for (un)pickling."""

    def __init__(self, queue_: Any) -> None:
        self.queue = queue_

    def put(self, message: Any) -> None:
        self.queue.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return pickle.loads(self.queue.get(*args, **kwargs))


def _worker_process(index: int, inbox: Any, outbox: Any, settings: WorkerSettings) -> None:
    """A Ray-hosted worker's process: at the normal scheduling priority, and gone with its actor.

    Ray starts its worker processes niced (`worker_niceness`, 15 by default) so the raylet keeps
    priority; a measuring loop at that niceness reads late whenever anything else wants the CPU.
    """
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            settings.notices.append(
                f"Ray runs its workers at niceness {niceness} and worker {index} could not undo it (needs "
                "CAP_SYS_NICE): its timing suffers when its node is busy; start the nodes with "
                "RAY_worker_niceness=0 (`RAY_worker_niceness=0 ray start ...`)")
    try:
        import ctypes
        import signal as signals

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signals.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the actor's kill still ends it when its queues close
        pass
    worker_main(index, _Pickled(inbox), _Pickled(outbox), settings)


def connect(address: str) -> dict[str, Any]:
    """Join the cluster at `address` (`auto`, `host:port` or `ray://host:port`); RayClusterError if it cannot be reached."""
    try:
        import ray
    except ImportError:
        raise RayClusterError("--ray needs Ray: pip install 'servescope[ray]'") from None
    if ray.is_initialized() and address != "auto" and address.split("://", 1)[-1] != _current_address(ray):
        ray.shutdown()  # this process joined another cluster before (a repeated run, a test): leave it
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONPATH": _package_root()}} if _package_root() else None)
        except Exception as exc:  # noqa: BLE001 - Ray raises several kinds; its message is what the user needs
            raise RayClusterError(f"--ray {address}: cannot join the Ray cluster: {type(exc).__name__}: {exc}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"address": address, "nodes": len(nodes),
            "cpus": sum(int(n.get("Resources", {}).get("CPU", 0)) for n in nodes),
            "spare_cpus": spare_cpus(nodes)}


def _current_address(ray: Any) -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a Ray Client connection has no GCS address of its own
        return None


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on: Ray itself retries such an address for minutes."""
    import socket

    if address == "auto" or address.startswith("local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayClusterError(f"--ray {address}: give auto, HOST:PORT (the head's GCS, `ray start --head` prints it) "
                              "or ray://HOST:PORT (Ray Client)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise RayClusterError(f"--ray {address}: cannot join the Ray cluster: nothing answers at {host}:{port} ({exc}); "
                              "start one with `ray start --head` or check the address") from None


def spare_cpus(nodes: list[dict[str, Any]]) -> int:
    """Workers the cluster can host by default: every node's CPUs but one (its raylet, the OS)."""
    return max(1, sum(max(0, int(n.get("Resources", {}).get("CPU", 0)) - 1) for n in nodes))


def _package_root() -> str | None:
    """The folder holding `servescope` when running from a source checkout (actors then import the same code)."""
    import servescope

    root = os.path.dirname(os.path.dirname(os.path.abspath(servescope.__file__)))
    return root if os.path.isfile(os.path.join(root, "pyproject.toml")) else None


class RayWorkerPool:
    """`count` worker actors spread over the cluster's nodes, one CPU each."""

    def __init__(self, count: int, settings: list[WorkerSettings]) -> None:
        import ray

        if count < 1 or len(settings) != count:
            raise ValueError(f"need one WorkerSettings per worker, got {len(settings)} for {count}")
        self._ray = ray
        remote = ray.remote(num_cpus=1, max_restarts=0, concurrency_groups={"io": 1, "out": 1, "clock": 1})(WorkerActor)
        self.actors = [remote.options(scheduling_strategy="SPREAD", name=None).remote() for _ in range(count)]
        try:
            self.nodes = ray.get([a.node.options(concurrency_group="clock").remote() for a in self.actors],
                                 timeout=ACTOR_START_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            raise RayClusterError(f"--ray: {count} worker actors could not start ({type(exc).__name__}: {exc}); "
                                  "give fewer --workers or add nodes") from None
        self.clocks: dict[str, NodeClock] = {}
        for node in dict.fromkeys(self.nodes):
            self._measure(node)
        self._last_sync = time.monotonic()
        self._last_send = 0.0
        self.outgoing: list[list[Any]] = [[] for _ in range(count)]
        self.lost: dict[int, str] = {}
        self.pending: dict[Any, int] = {}
        for index, (actor, node, one) in enumerate(zip(self.actors, self.nodes, settings)):
            one.client = {**one.client, "clock_origin": float(one.client["clock_origin"]) + self.clocks[node].offset_s}
            one.node = node
            actor.start.options(concurrency_group="io").remote(index, one)
            self.pending[actor.drain.options(concurrency_group="out").remote(DRAIN_WAIT_S)] = index

    # -- clocks ---------------------------------------------------------------------------------

    def _measure(self, node: str) -> None:
        actor = self.actors[self.nodes.index(node)]
        here = boot_id()
        if here is not None and self._ray.get(actor.kernel.options(concurrency_group="clock").remote()) == here:
            # One kernel, one monotonic clock: the offset is zero by construction, not by estimate.
            sample = (time.perf_counter(), 0.0, 0.0)
            if node in self.clocks:
                self.clocks[node].samples.append(sample)
            else:
                self.clocks[node] = NodeClock(node, 0.0, 0.0, [sample], same_kernel=True)
            return
        best = self.estimate_offset(actor)
        clock = self.clocks.get(node)
        sample = (time.perf_counter(), best[1], best[0])
        if clock is None:
            self.clocks[node] = NodeClock(node, best[1], best[0], [sample])
        else:
            clock.samples.append(sample)

    def estimate_offset(self, actor: Any, pings: int = CLOCK_PINGS) -> tuple[float, float]:
        """(half round trip, offset) of the fastest of `pings` clock reads: node time = driver time + offset."""
        best: tuple[float, float] | None = None
        for _ in range(pings):
            t0 = time.perf_counter()
            remote_t = self._ray.get(actor.clock.options(concurrency_group="clock").remote())
            t1 = time.perf_counter()
            half, offset = (t1 - t0) / 2, remote_t - (t0 + t1) / 2
            if best is None or half < best[0]:
                best = (half, offset)
        assert best is not None
        return best

    def describe(self) -> dict[str, Any]:
        per_node: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            per_node.setdefault(node, []).append(index)
        return {"workers": len(self.actors), "nodes": [
            {**self.clocks[node].describe(), "workers": indexes} for node, indexes in per_node.items()],
            "lost_workers": [{"worker": w, "reason": r} for w, r in self.lost.items()]}

    # -- the channel ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.actors)

    def send(self, worker: int, message: Any) -> None:
        self.outgoing[worker].append(message)

    def broadcast(self, message: Any) -> None:
        for worker in range(len(self.actors)):
            self.outgoing[worker].append(message)
        self._flush(force=True)

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_send < BATCH_S:
            return
        self._last_send = now
        for worker, messages in enumerate(self.outgoing):
            if messages and worker not in self.lost:
                payload = [pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL) for m in messages]
                self.actors[worker].send.options(concurrency_group="io").remote(payload)
                self.outgoing[worker] = []
            elif messages:
                messages.clear()

    def poll(self, timeout: float) -> list[Any]:
        self._flush()
        if time.monotonic() - self._last_sync > RESYNC_S:
            self._last_sync = time.monotonic()
            for node in self.clocks:
                if any(n == node and w not in self.lost for w, n in enumerate(self.nodes)):
                    try:
                        self._measure(node)
                    except Exception:  # noqa: BLE001 - a node that went away is noticed by its drains
                        pass
        if not self.pending:
            time.sleep(timeout)
            return []
        ready, _ = self._ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if ready:
            more, _ = self._ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            ready = list(dict.fromkeys(ready + more))
        messages: list[Any] = []
        for ref in ready:
            worker = self.pending.pop(ref)
            try:
                messages.extend(pickle.loads(raw) for raw in self._ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - RayActorError and friends: the actor or its node died
                self.lost[worker] = _reason(exc)
                continue
            self.pending[self.actors[worker].drain.options(concurrency_group="out").remote(DRAIN_WAIT_S)] = worker
        return messages

    def dead(self) -> list[int]:
        return sorted(self.lost)

    def kill(self, worker: int) -> None:
        """End one worker's actor at once (what a node failure does; used by tests)."""
        self._ray.kill(self.actors[worker], no_restart=True)

    tolerates_loss = True  # the dispatcher goes on without a lost actor (its in-flight requests: worker_lost)

    def close(self, timeout: float = 5.0) -> None:
        """End every actor (after the dispatcher's Shutdown or Stop, or on Ctrl-C)."""
        for actor in self.actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.pending.clear()


def _reason(exc: BaseException) -> str:
    """One line for run.json and the console: the error's type and its last meaningful line, no colour codes."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    return f"{type(exc).__name__}: {lines[-1] if lines else 'no message'}"[:300]
