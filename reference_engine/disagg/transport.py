"""How a prompt's KV blocks travel from a prefill engine process to a decode engine process.

A transport is three calls: the producer's `send(kv)` puts a tensor where a
consumer can take it and returns a small picklable `KVHandle`; the consumer's
`receive(handle)` returns the tensor and releases what the handle held; and
`discard(handle)` releases a handle nobody will receive (the client left
between prefill and decode). Handles travel through the front end with the
request, so a transport needs no connection between every prefill and every
decode process.

- `shm` (the CPU default): one POSIX shared-memory segment per transfer; the
  producer writes the blocks once, the consumer copies them out and unlinks.
  The front end relays only the segment's name.
- `socket`: the bytes ride in the handle through the front end's sockets (two
  copies through the front end's process; for comparison, and where /dev/shm
  is small).

On a GPU the blocks are staged through host memory (`shm`) until device
transports slot in behind the same three calls: CUDA IPC on one GPU, NCCL
send/recv between GPUs.
"""

from __future__ import annotations

import abc
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import torch
from torch import Tensor

from servescope.reference_engine.errors import ConfigError

TRANSPORTS = ("shm", "socket")


@dataclass(frozen=True)
class KVHandle:
    """What a consumer needs to take one transfer: the tensor's shape and dtype and where it lies."""

    transport: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"
    nbytes: int
    ref: Any  # shm: the segment's name; socket: the bytes themselves


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _as_bytes(kv: Tensor) -> Tensor:
    """`kv` on the host, contiguous, viewed as flat bytes (bfloat16 has no numpy dtype; bytes always work)."""
    return kv.detach().to("cpu").contiguous().view(-1).view(torch.uint8)


class KVTransport(abc.ABC):
    name: str

    @abc.abstractmethod
    def send(self, kv: Tensor) -> KVHandle:
        """Make `kv` available to a consumer (producer side); the returned handle is small unless said otherwise."""

    @abc.abstractmethod
    def receive(self, handle: KVHandle, device: torch.device) -> Tensor:
        """The tensor `handle` stands for, on `device`; releases what the handle held."""

    @abc.abstractmethod
    def discard(self, handle: KVHandle) -> None:
        """Release a handle that will never be received (any process may call it)."""


class SharedMemoryTransport(KVTransport):
    name = "shm"

    def send(self, kv: Tensor) -> KVHandle:
        data = _as_bytes(kv)
        nbytes = data.numel()
        segment = shared_memory.SharedMemory(name="servescope-kv-" + secrets.token_hex(8), create=True,
                                             size=max(nbytes, 1))
        try:
            view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes)
            view.copy_(data)
            del view  # the segment cannot close while a tensor exports its buffer
        finally:
            segment.close()
        return KVHandle(self.name, tuple(kv.shape), str(kv.dtype).removeprefix("torch."), nbytes, segment.name)

    def receive(self, handle: KVHandle, device: torch.device) -> Tensor:
        segment = shared_memory.SharedMemory(name=handle.ref)
        try:
            view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=handle.nbytes)
            out = view.to(device, copy=True)
            del view
        finally:
            segment.close()
            segment.unlink()
        return out.view(_dtype(handle.dtype)).reshape(handle.shape)

    def discard(self, handle: KVHandle) -> None:
        try:
            segment = shared_memory.SharedMemory(name=handle.ref)
        except FileNotFoundError:
            return  # received (and unlinked) already
        segment.close()
        segment.unlink()


class SocketTransport(KVTransport):
    name = "socket"

    def send(self, kv: Tensor) -> KVHandle:
        data = _as_bytes(kv)
        return KVHandle(self.name, tuple(kv.shape), str(kv.dtype).removeprefix("torch."), data.numel(),
                        data.numpy().tobytes())

    def receive(self, handle: KVHandle, device: torch.device) -> Tensor:
        flat = torch.frombuffer(bytearray(handle.ref), dtype=torch.uint8) if handle.nbytes else \
            torch.empty(0, dtype=torch.uint8)
        return flat.to(device).view(_dtype(handle.dtype)).reshape(handle.shape)

    def discard(self, handle: KVHandle) -> None:
        return None  # the bytes go when the handle does


def resolve_transport(name: str, device: str) -> str:
    """The transport `--kv-transport NAME` means on `device` ("auto": shared memory; on a GPU through host
    memory until a device transport exists)."""
    if name == "auto":
        return "shm"
    if name not in TRANSPORTS:
        raise ConfigError(f"--kv-transport must be auto, {', '.join(TRANSPORTS)}; got {name!r}")
    return name


def make_transport(name: str) -> KVTransport:
    return {"shm": SharedMemoryTransport, "socket": SocketTransport}[name]()
