"""The HTTP front end's tokenizer: prompts that arrive together are encoded together, off the event loop.

Why: a burst of requests (a closed loop's wave, a client that opens many streams at once) reaches
the server in one event-loop iteration, and each handler tokenized its prompt in turn on the loop:
about 0.5 ms per 512-token prompt on these 2-core machines, half of what the server spends taking a
request in (`benchmarks/server_ingest.py`: 128 text prompts took 1.1-1.3 ms each, the same prompts
as token ids 0.4-0.5 ms). Meanwhile the loop wrote no SSE chunks. Here each handler awaits its ids
while the prompts queued in the same iteration go to the Rust tokenizer's `encode_batch`, up to
MAX_BATCH per call, on a worker thread: it releases the GIL and spreads a batch over the cores, so
the loop keeps streaming. The burst's last request was in after 120-137 ms against 146-167 ms
before on 2 cores, and after 54-57 ms against 123-172 ms on 16. A lone short prompt is encoded
inline, where a thread hop would cost more than the encoding.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from servescope.reference_engine.tokenization import EngineTokenizer

# A flush whose prompts total fewer characters than this is encoded on the event loop (tens of µs).
INLINE_CHARS = 2048
# Prompts per encode_batch call: a burst's first requests reach the engine after their own batch,
# not after the whole burst's (benchmarks/server_ingest.py on 2 cores: with all 128 in one batch the
# first response header came after 62 ms, against 14 ms one at a time; 24-32 ms with 32).
MAX_BATCH = 32


class BatchTokenizer:
    """`await encode(text)`: the prompt's ids, from one `encode_batch` per event-loop iteration."""

    def __init__(self, tokenizer: EngineTokenizer, inline_chars: int = INLINE_CHARS) -> None:
        self.tokenizer = tokenizer
        self.inline_chars = inline_chars
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[bool, list[tuple[str, asyncio.Future[list[int]]]]] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self.batches = 0  # encode_batch calls so far, and how many of them ran on the worker thread
        self.batches_off_loop = 0

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"a prompt to tokenize must be a str, got {type(text).__name__}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after the handlers that are ready in this iteration
        self._pending.setdefault(add_special_tokens, []).append((text, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        chunks = [(flag, items[i:i + MAX_BATCH]) for flag, items in pending.items()
                  for i in range(0, len(items), MAX_BATCH)]
        for add_special_tokens, items in chunks:
            texts = [text for text, _ in items]
            futures = [future for _, future in items]
            self.batches += 1
            if sum(map(len, texts)) < self.inline_chars:
                try:
                    ids, error = self.tokenizer.encode_batch(texts, add_special_tokens), None
                except Exception as exc:  # noqa: BLE001 - handed to every waiting handler
                    ids, error = None, exc
                self._resolve(futures, ids, error)
            else:
                self.batches_off_loop += 1
                task = asyncio.ensure_future(self._encode_off_loop(futures, texts, add_special_tokens))
                self._tasks.add(task)  # a task nobody references may be collected mid-run
                task.add_done_callback(self._tasks.discard)

    async def _encode_off_loop(self, futures: list[asyncio.Future[list[int]]], texts: list[str],
                               add_special_tokens: bool) -> None:
        if self._executor is None:  # one thread: batches queue behind each other, each spread by Rust
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(self._executor, self.tokenizer.encode_batch, texts,
                                             add_special_tokens)
            error = None
        except Exception as exc:  # noqa: BLE001 - handed to every waiting handler
            ids, error = None, exc
        self._resolve(futures, ids, error)

    @staticmethod
    def _resolve(futures: list[asyncio.Future[list[int]]], ids: list[list[int]] | None,
                 error: BaseException | None) -> None:
        for i, future in enumerate(futures):
            if future.done():  # its handler was cancelled while waiting (the client left)
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(ids[i])

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
