"""Tensor-parallel ranks 1..N-1: spawned by rank 0 (the engine), each runs rank 0's steps on its shard.

Rank 0 is the engine itself: it schedules, samples, detokenizes and talks to
the server. For each step it sends the step's inputs (`StepInputs`: the
scheduler's plain lists, without the sequences) to every other rank, then runs
its own shard; every rank takes the same path (CUDA graph bucket, piecewise or
eager) on the same inputs, so their collectives meet in the same order. With
overlapped scheduling rank 0 also broadcasts each step's sampled ids (NCCL, a
few bytes), which the other ranks' next inputs gather their placeholders from.

Why a private socketpair per rank (frames.py) for the steps, not a
torch.distributed broadcast: a rank waiting for the next step must be able to
wait forever (an idle server) without a collective's timeout, and the end of
file of a socket tells either side at once that the other is gone. The data
plane (all-reduce, all-gather) is torch.distributed: NCCL on CUDA, gloo on the
CPU, with the rendezvous on loopback (a TCPStore on 127.0.0.1 that rank 0 opens
on a free port).

Faults: rank 0 watches every rank's process and socket from a thread. A rank
that dies (an exception, reported with its traceback over its socket, or a
signal) is fatal: `on_fatal(reason)` runs, which in the engine process tells
the server why and exits, so the server answers 503 and exits 1 instead of
hanging in a collective that will never complete. Other ranks ignore SIGINT
(rank 0 stops them in order) and exit on their own when rank 0 goes away.
"""

from __future__ import annotations

import atexit
import logging
import subprocess
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servescope.reference_engine.errors import ConfigError, EngineError
from servescope.reference_engine.frames import FrameDecoder, encode

if TYPE_CHECKING:
    import torch

    from servescope.reference_engine.config import EngineConfig, ModelConfig
    from servescope.reference_engine.model_runner import StepInputs

log = logging.getLogger(__name__)

# Collectives of one step meet within seconds; a rank silent this long inside one is stuck.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
STOP_TIMEOUT_S = 10.0
PARENT_POLL_S = 0.5
STATS_EVERY_S = 0.5  # how often a rank reports its step times to rank 0
_RECV_BYTES = 1 << 20


class RankFailed(EngineError):
    """A tensor-parallel rank died or failed; the message names the rank and its error."""


# -- per-rank step times --------------------------------------------------------------------------

STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0)


@dataclass
class StepStats:
    """A histogram of one rank's step times (seconds), as Prometheus exports it."""

    count: int = 0
    total_s: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(STEP_BUCKETS))  # not cumulative

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        for i, bound in enumerate(STEP_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                break


class StepTimer:
    """Times this rank's steps: host time on the CPU (gloo collectives block, so it is the step's
    whole time), CUDA events on a GPU (the device's time for the step, collectives included; read
    once finished, so timing never makes the host wait for the GPU)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.stats = StepStats()
        self._started: Any = None
        self._pending: list[tuple[Any, Any]] = []

    def begin(self) -> None:
        if self.cuda:
            import torch

            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            import torch

            done = torch.cuda.Event(enable_timing=True)
            done.record()
            self._pending.append((self._started, done))
            self.drain()
        else:
            self.stats.add(time.perf_counter() - self._started)

    def drain(self) -> None:
        while self._pending and self._pending[0][1].query():
            start, done = self._pending.pop(0)
            self.stats.add(start.elapsed_time(done) / 1e3)


# -- what a rank needs to start ---------------------------------------------------------------------

@dataclass(frozen=True)
class RankLaunch:
    """Everything rank `rank` needs to build its shard and join the group."""

    model_config: ModelConfig
    config: EngineConfig
    checkpoint_dir: str | None
    max_model_len: int
    rank: int
    size: int
    store_port: int
    torch_threads: int


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    import torch

    return torch.device("cuda", rank) if config.device.startswith("cuda") else torch.device("cpu")


def join_group(launch: RankLaunch, store: Any = None) -> Any:
    """Join the tensor-parallel process group (NCCL on CUDA, gloo on the CPU) through the loopback
    TCPStore; returns this rank's TPGroup."""
    import torch
    import torch.distributed as dist

    from servescope.reference_engine.tensor_parallel import ShardPlan, TPGroup

    # Loopback by default: gloo and NCCL's bootstrap would otherwise pick the host's first interface.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    cuda = launch.config.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(launch.rank)
    if store is None:
        store = dist.TCPStore("127.0.0.1", launch.store_port, launch.size, is_master=False,
                              timeout=COLLECTIVE_TIMEOUT)
    kwargs: dict[str, Any] = {}
    if cuda:
        kwargs["device_id"] = torch.device("cuda", launch.rank)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=launch.rank, world_size=launch.size,
                            timeout=COLLECTIVE_TIMEOUT, **kwargs)
    return TPGroup(ShardPlan.of(launch.model_config, launch.rank, launch.size))


# -- a rank other than 0 ----------------------------------------------------------------------------

def _exit_with_parent(parent: int) -> None:
    """A rank blocked inside a collective never sees its socket close: leave once rank 0 is gone."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def _worker_main(fd: int, parent: int) -> None:
    """`python -m servescope.reference_engine.tp_workers FD PARENT_PID`: the socket to rank 0 is FD; the
    first frame on it is this rank's RankLaunch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; rank 0 stops this rank
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="tp-parent").start()
    sock = socket.socket(fileno=fd)
    try:
        decoder = FrameDecoder()
        launch = None
        while launch is None:
            data = sock.recv(_RECV_BYTES)
            if not data:
                return
            frames = decoder.feed(data)
            if frames:
                launch = frames[0]
        _serve_rank(launch, sock, decoder)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach rank 0 with its traceback
        try:
            sock.sendall(encode(("error", type(exc).__name__, f"{type(exc).__name__}: {exc}",
                                 traceback.format_exc())))
        except OSError:
            pass
        os._exit(1)
    sock.close()


def _serve_rank(launch: RankLaunch, sock: socket.socket, decoder: FrameDecoder) -> None:
    import torch
    import torch.distributed as dist

    from servescope.reference_engine.model_loader import build_model, local_kv_blocks, torch_dtype
    from servescope.reference_engine.model_runner import ModelRunner
    from servescope.reference_engine.ops import build_ops

    torch.set_num_threads(launch.torch_threads)
    torch.manual_seed(launch.config.seed)
    tp = join_group(launch)
    config = launch.config
    device = rank_device(config, launch.rank)
    dtype = torch_dtype(config.dtype, config.device)
    model = build_model(launch.model_config, config, device, dtype, launch.max_model_len, launch.checkpoint_dir, tp)
    ops = build_ops(config.attention_backend, config.device)
    sock.sendall(encode(("ready", local_kv_blocks(launch.model_config, config, model.num_kv_heads, device, dtype))))
    runner: ModelRunner | None = None
    prev_ids: torch.Tensor | None = None
    last_report = time.monotonic()
    unreported = False  # steps run since the last report: an idle rank still sends its last ones
    while True:
        # Wake at least every STATS_EVERY_S, so the step times of a burst that ended reach rank 0.
        if not select.select([sock], [], [], STATS_EVERY_S)[0]:
            data = None
        else:
            data = sock.recv(_RECV_BYTES)
            if not data:
                return  # rank 0 is gone
        for message in decoder.feed(data) if data else ():
            kind = message[0]
            if kind == "step":
                _, inputs, share_ids = message
                unreported = True
                runner.execute(inputs, prev_ids)  # type: ignore[union-attr]
                if share_ids and inputs.logit_rows:
                    prev_ids = torch.empty(len(inputs.logit_rows), dtype=torch.int64, device=device)
                    dist.broadcast(prev_ids, src=0)
            elif kind == "kv":
                runner = ModelRunner(model, ops, launch.model_config, config, message[1], device, dtype)
                runner.timer = StepTimer(device.type == "cuda")
            elif kind == "capture":
                runner.capture_graphs(**message[1])  # type: ignore[union-attr]
            elif kind == "stop":
                return
        if runner is not None and unreported and time.monotonic() - last_report >= STATS_EVERY_S:
            runner.timer.drain()
            sock.sendall(encode(("stats", runner.timer.stats)))
            last_report, unreported = time.monotonic(), False


# -- rank 0's side ----------------------------------------------------------------------------------

class _Process:
    """A rank's process (a plain subprocess: the engine process that starts the ranks is a
    multiprocessing daemon, which may not have multiprocessing children) with a pidfd to select on."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid
        try:
            self.sentinel = os.pidfd_open(popen.pid)  # readable once the process has exited
        except OSError:  # a kernel without pidfds (gVisor): a pipe whose writer closes when it exits
            self.sentinel, done = os.pipe()
            threading.Thread(target=self._close_on_exit, args=(done,), daemon=True, name="tp-reaper").start()

    def _close_on_exit(self, done: int) -> None:
        self.popen.wait()
        os.close(done)

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()


@dataclass
class _Rank:
    rank: int
    process: _Process
    sock: socket.socket
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    kv_blocks: int | None = None
    error: tuple[str, str, str] | None = None  # (type name, message, traceback) it reported
    stats: Any = None


def _default_fatal(reason: str) -> None:
    print(f"servescope reference engine: {reason}", file=sys.stderr, flush=True)
    os._exit(1)


class RankWorkers:
    """Rank 0's handle on ranks 1..N-1: start-up, the per-step messages, the watchdog, shutdown."""

    def __init__(self, ranks: list[_Rank], on_fatal: Callable[[str], None] = _default_fatal) -> None:
        self.ranks = ranks
        self.on_fatal = on_fatal  # called once, from any thread, when a rank dies while serving
        self.serving = False
        self.stopping = False
        self.failure: str | None = None
        self.failure_type: str | None = None
        self._fatal_once = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._ready = threading.Event()
        self._failed = threading.Event()
        self.store: Any = None  # rank 0 hosts the rendezvous store; it must outlive the group
        self.group_joined = False
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="tp-watchdog")
        self._watchdog.start()

    @classmethod
    def start(cls, model_config: ModelConfig, config: EngineConfig, checkpoint_dir: str | Path | None,
              max_model_len: int, torch_threads: int) -> tuple[RankWorkers, Any]:
        """Spawn ranks 1..N-1 and join the group as rank 0; returns (workers, rank 0's TPGroup)."""
        import torch.distributed as dist

        size = config.tensor_parallel_size
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                              wait_for_workers=False)
        ranks: list[_Rank] = []
        base = RankLaunch(model_config, config, str(checkpoint_dir) if checkpoint_dir else None, max_model_len,
                          0, size, store.port, torch_threads)
        for rank in range(1, size):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "servescope.reference_engine.tp_workers", str(theirs.fileno()),
                     str(os.getpid())], pass_fds=[theirs.fileno()])
            finally:
                theirs.close()
            mine.sendall(encode(replace(base, rank=rank)))
            ranks.append(_Rank(rank, _Process(popen), mine))
        workers = cls(ranks)
        atexit.register(workers.stop)  # ranks never outlive this interpreter (they also leave if it dies)
        try:
            tp = join_group(base, store)
        except BaseException:
            workers.stop()
            raise
        workers.store = store  # the store must outlive the group
        workers.group_joined = True
        return workers, tp

    @property
    def pids(self) -> list[int | None]:
        return [r.process.pid for r in self.ranks]

    # -- start-up -----------------------------------------------------------------
    def agree_kv_blocks(self, own: int, timeout: float = 600.0) -> int:
        """Wait for every rank's built shard and KV block count; all ranks take the smallest."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            self._raise_if_failed()
            if time.monotonic() > deadline:
                raise RankFailed(f"tensor-parallel ranks were not ready within {timeout:.0f} s")
        self._raise_if_failed()
        blocks = min([own] + [r.kv_blocks for r in self.ranks])  # type: ignore[list-item]
        self.send(("kv", blocks))
        self.serving = True  # from here on every rank is in lockstep: a death is fatal at once
        return blocks

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            self.stop()
            if self.failure_type == "ConfigError":
                raise ConfigError(self.failure)
            raise RankFailed(self.failure)

    # -- serving ----------------------------------------------------------------------
    def send(self, message: tuple) -> None:
        frame = encode(message)
        for r in self.ranks:
            r.sock.sendall(frame)

    def publish(self, inputs: StepInputs, share_ids: bool) -> None:
        """The step every rank runs next (the sequences stay here: only lists travel)."""
        self.send(("step", replace(inputs, requests=[]), share_ids))

    @staticmethod
    def share_ids(ids: torch.Tensor) -> None:
        """This step's sampled ids to every rank (their next step's placeholders gather from them)."""
        import torch.distributed as dist

        dist.broadcast(ids, src=0)

    def check(self, wait_s: float = 5.0) -> None:
        """After a failed step: if a rank died (the watchdog sees it within `wait_s`), report that
        (on_fatal) rather than the collective's error, which only says that a peer vanished."""
        if not self._failed.wait(wait_s):
            return
        self._fatal(self.failure)  # type: ignore[arg-type]
        raise RankFailed(self.failure)  # on_fatal returned (in-process use): the step fails with it

    def rank_stats(self) -> dict[int, Any]:
        return {r.rank: r.stats for r in self.ranks if r.stats is not None}

    # -- the watchdog -----------------------------------------------------------------
    def _watch(self) -> None:
        live = {r.sock.fileno(): r for r in self.ranks}
        sentinels = {r.process.sentinel: r for r in self.ranks}
        while not self.stopping:
            readable, _, _ = select.select(list(live) + list(sentinels) + [self._wake_r.fileno()], [], [])
            if self.stopping:
                return
            for fd in readable:
                if fd in live and not self._read(live[fd]):
                    del live[fd]  # end of file: its process is ending, its sentinel follows
            for fd in readable:
                if fd in sentinels:
                    rank = sentinels.pop(fd)
                    while rank.sock.fileno() in live and self._read(rank):  # its last words, if any
                        pass
                    if not self.stopping:
                        self._died(rank)
                    return

    def _read(self, rank: _Rank) -> bool:
        """Read what the rank has sent; False at end of file (or nothing more to read)."""
        try:
            data = rank.sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError included: nothing more now
            return False
        if not data:
            return False
        for message in rank.decoder.feed(data):
            if message[0] == "ready":
                rank.kv_blocks = message[1]
                if all(r.kv_blocks is not None for r in self.ranks):
                    self._ready.set()
            elif message[0] == "stats":
                rank.stats = message[1]
            elif message[0] == "error":
                rank.error = message[1:]
        return True

    def _died(self, rank: _Rank) -> None:
        rank.process.join(1.0)
        code = rank.process.exitcode
        if rank.error is not None:
            type_name, text, trace = rank.error
            log.error("tensor-parallel rank %d failed:\n%s", rank.rank, trace)
            reason = f"tensor-parallel rank {rank.rank} failed: {text}"
        elif code is not None and code < 0:
            reason = (f"tensor-parallel rank {rank.rank} (pid {rank.process.pid}) was killed by "
                      f"{signal.Signals(-code).name}")
            type_name = "RankFailed"
        else:
            reason = f"tensor-parallel rank {rank.rank} (pid {rank.process.pid}) exited with code {code}"
            type_name = "RankFailed"
        self.failure_type = type_name
        self.failure = reason
        self._failed.set()
        if self.serving:
            self._fatal(reason)

    def _fatal(self, reason: str) -> None:
        if not self._fatal_once.acquire(blocking=False):
            return
        self._terminate_all()
        self.on_fatal(reason)

    # -- shutdown -------------------------------------------------------------------------
    def _terminate_all(self) -> None:
        for r in self.ranks:
            if r.process.is_alive():
                r.process.kill()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Tell every rank to stop and reap it (terminate, then kill, one that does not); idempotent."""
        if self.stopping:
            return
        self.stopping = True
        atexit.unregister(self.stop)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        for r in self.ranks:
            try:
                r.sock.send(encode(("stop",)), socket.MSG_DONTWAIT)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for r in self.ranks:
            r.process.join(max(0.0, deadline - time.monotonic()))
            if r.process.is_alive():
                r.process.terminate()
                r.process.join(5.0)
            if r.process.is_alive():
                r.process.kill()
                r.process.join(5.0)
            r.sock.close()
            os.close(r.process.sentinel)
        import torch.distributed as dist

        if self.group_joined and dist.is_initialized():
            dist.destroy_process_group()  # this process may build another engine (tests, benchmarks)
        self.store = None


if __name__ == "__main__":
    # Through the module's import name, so what this rank pickles to rank 0 (StepStats) unpickles there.
    from servescope.reference_engine.tp_workers import _worker_main as worker_main

    worker_main(int(sys.argv[1]), int(sys.argv[2]))
