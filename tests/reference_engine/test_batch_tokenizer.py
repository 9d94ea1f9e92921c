"""The front end's BatchTokenizer: prompts awaited together come back as the plain tokenizer's ids,
from one encode_batch per event-loop iteration, long batches off the loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from servescope.reference_engine.batch_tokenizer import BatchTokenizer
from servescope.reference_engine.tokenization import EngineTokenizer, tokenizer_dir_for

PROSE = Path(__file__).resolve().parents[2] / "workloads" / "corpus" / "prose.txt"


@pytest.fixture(scope="module")
def tokenizer() -> EngineTokenizer:
    return EngineTokenizer(tokenizer_dir_for(None, None))


def _texts() -> list[str]:
    prose = PROSE.read_text()
    return [prose[i * 997:i * 997 + 40 + 300 * (i % 4)] for i in range(24)]


def test_concurrent_prompts_match_the_tokenizer_in_one_batch_per_flag(tokenizer) -> None:
    texts = _texts()
    batcher = BatchTokenizer(tokenizer)

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(batcher.encode(t, add_special_tokens=i % 3 != 0) for i, t in enumerate(texts)))

    try:
        ids = asyncio.run(main())
    finally:
        batcher.close()
    assert ids == [tokenizer.encode(t, add_special_tokens=i % 3 != 0) for i, t in enumerate(texts)]
    assert batcher.batches == 2  # one per add_special_tokens value
    assert batcher.batches_off_loop == 2  # long batches: encoded on the worker thread


def test_a_short_lone_prompt_is_encoded_inline_and_requests_apart_get_their_own_batch(tokenizer) -> None:
    batcher = BatchTokenizer(tokenizer)

    async def main() -> tuple[list[int], list[int]]:
        first = await batcher.encode("hello there")
        second = await batcher.encode("general kenobi")
        return first, second

    try:
        first, second = asyncio.run(main())
    finally:
        batcher.close()
    assert first == tokenizer.encode("hello there") and second == tokenizer.encode("general kenobi")
    assert batcher.batches == 2 and batcher.batches_off_loop == 0


def test_a_cancelled_waiter_leaves_the_others_their_ids_and_bad_input_is_refused(tokenizer) -> None:
    texts = _texts()[:6]
    batcher = BatchTokenizer(tokenizer, inline_chars=0)  # every batch off the loop

    async def main() -> list:
        tasks = [asyncio.ensure_future(batcher.encode(t)) for t in texts]
        await asyncio.sleep(0)  # all queued in this iteration
        tasks[2].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(TypeError, match="must be a str"):
            await batcher.encode(None)  # type: ignore[arg-type]
        return done

    try:
        done = asyncio.run(main())
    finally:
        batcher.close()
    assert isinstance(done[2], asyncio.CancelledError)
    assert [d for i, d in enumerate(done) if i != 2] == [tokenizer.encode(t) for i, t in enumerate(texts) if i != 2]
