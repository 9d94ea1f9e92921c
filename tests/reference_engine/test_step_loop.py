"""One step loop serves both modes: the thread and the process client deliver the same outputs.

An output that finishes a request always reaches its handler, with or without new text (it
carries the finish reason and usage); a mid-stream output without new text never does.
"""

from __future__ import annotations

import asyncio
import time

from servescope.reference_engine.async_engine import AsyncEngine
from servescope.reference_engine.engine_client import EngineClient, RequestOutput
from servescope.reference_engine.engine_process import ProcessEngineClient, start_engine_process
from servescope.reference_engine.metrics import EngineMetrics
from servescope.reference_engine.sequence import SamplingParams
from servescope.reference_engine.step_loop import StepLoop
from servescope.reference_engine.tokenization import IncrementalDetokenizer

GREEDY = {"temperature": 0, "ignore_eos": True}
HOLD_BACK = "~" * 40  # a stop string that never matches: every step holds back its last 39 characters


def _step_texts(engine, prompt: list[int], max_tokens: int) -> list[str]:
    """The text each greedy token adds, as the engine's detokenizer streams it."""
    seq = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, **GREEDY))[0]
    detok = IncrementalDetokenizer(engine.tokenizer, prompt, ())
    return [detok.push([token])[0] for token in seq.output_token_ids]


def _finishing_without_text(engine) -> tuple[list[int], SamplingParams]:
    """A greedy request whose stop string is the first character of a later token's text, found
    nowhere before it: the request finishes on that token's step, which adds no text."""
    for words in ("the quick brown fox", "one two three", "hello there", "a b c d e f"):
        prompt = engine.tokenizer.encode(words)
        texts = _step_texts(engine, prompt, 16)
        for i in range(1, len(texts)):
            before = "".join(texts[:i])
            if before and texts[i] and texts[i][0] not in before:
                return prompt, SamplingParams(max_tokens=16, stop=(texts[i][0],), **GREEDY)
    raise AssertionError("no prompt gives a token that starts with a new character")


def _requests(engine) -> list[tuple[list[int], SamplingParams]]:
    encode = engine.tokenizer.encode
    return [
        (encode("the quick brown fox"), SamplingParams(max_tokens=12, **GREEDY)),
        (encode("one two three"), SamplingParams(max_tokens=10, stop=(HOLD_BACK,), **GREEDY)),
        _finishing_without_text(engine),
        (encode("hello there"), SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)),
    ]


async def _serve(client: EngineClient, requests) -> list[list[RequestOutput]]:
    async def outputs(prompt, params) -> list[RequestOutput]:
        return [out async for out in client.generate(prompt, params)]

    await client.start()
    try:
        return await asyncio.gather(*(outputs(p, sp) for p, sp in requests))
    finally:
        await client.stop()


def test_thread_and_process_mode_deliver_the_same_outputs(engine_factory, launch_factory) -> None:
    requests = _requests(engine_factory())
    thread = asyncio.run(_serve(AsyncEngine(engine_factory()), requests))
    process = asyncio.run(_serve(ProcessEngineClient(start_engine_process(launch_factory())), requests))
    assert process == thread

    reference = engine_factory()  # the engine driven directly: the same text, token by token
    for (prompt, params), outs in zip(requests, thread):
        assert outs[-1].finished and not any(out.finished for out in outs[:-1])
        assert all(out.text for out in outs[:-1]), "a mid-stream output without text was delivered"
        seq = reference.add_request(prompt, params)
        texts = []
        while not seq.finished:
            texts += [out.text for out in reference.step() if out.seq is seq]
        assert "".join(out.text for out in outs) == "".join(texts)
        assert outs[-1].finish_reason == seq.finish_reason
        assert outs[-1].usage["completion_tokens"] == seq.num_output_tokens

    held_back = thread[1]
    assert len(held_back) < 10 and held_back[-1].finish_reason == "length"  # steps without text were skipped
    finished_without_text = thread[2][-1]
    assert (finished_without_text.text, finished_without_text.finish_reason) == ("", "stop")


def test_step_loop_messages(engine_factory) -> None:
    """Commands in, messages out, with no thread or socket: replies, refused adds, aborts, figures."""
    engine = engine_factory()
    loop = StepLoop(engine, EngineMetrics("tiny"), "thread")
    prompt = engine.tokenizer.encode("the quick brown fox")
    script = [
        [("add", "a", prompt, SamplingParams(max_tokens=3, **GREEDY), "", "ra", 0.0),
         ("add", "b", prompt, SamplingParams(max_tokens=50, **GREEDY), "", "rb", 0.0),
         ("add", "bad", [], SamplingParams(max_tokens=2), "", "rbad", 0.0),
         ("call", 7, "state")],
        [("abort", "b")],
    ]
    sent: list[tuple] = []

    def receive(block: bool) -> list[tuple] | None:
        if script:
            return script.pop(0)
        return None if block else []  # idle with nothing more to come: the end of the commands

    loop.run(receive, sent.append)
    reply = sent[0]
    assert reply[:2] == ("reply", 7) and reply[2]["mode"] == "thread" and reply[2]["waiting"] == 2
    outs = [m for m in sent if m[0] == "out"]
    assert outs[0][2] == [("bad", "the prompt is empty")] and outs[0][3] == 3  # three adds taken
    delivered = [o for m in outs for o in m[1]]
    assert [o[0] for o in delivered if o[2]] == ["a"]  # "b" was aborted: it never finishes
    assert delivered[-1][:4] == ("a", delivered[-1][1], True, "length") and delivered[-1][4]["completion_tokens"] == 3
    assert not loop.seqs and not loop.keys
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_debug_pause_stalls_every_request_on_schedule(engine_factory) -> None:
    """--debug-pause 0.3s:0.2s: while requests run, the loop stands still 0.2 s every 0.3 s; idle, it never does."""
    engine = engine_factory(debug_pause=(0.3, 0.2))
    loop = StepLoop(engine, EngineMetrics("tiny"), "thread")
    prompt = engine.tokenizer.encode("the quick brown fox")
    script = [[("add", "a", prompt, SamplingParams(max_tokens=400, **GREEDY), "", "ra", 0.0)]]
    step_times: list[float] = []

    def receive(block: bool) -> list[tuple] | None:
        if script:
            return script.pop(0)
        return None if block else []

    def send(message: tuple) -> None:
        step_times.append(time.monotonic())

    started = time.monotonic()
    loop.run(receive, send)
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    stalls = [g for g in gaps if g >= 0.19]
    elapsed = step_times[-1] - started
    assert len(stalls) >= max(1, int(elapsed / 0.5) - 1), (elapsed, sorted(gaps)[-5:])
    assert all(g < 0.45 for g in gaps), "one pause at a time, FOR seconds long"
    assert not engine.has_unfinished() and loop.pause_if_due() is None  # idle: no pause is taken
