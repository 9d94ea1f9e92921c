"""The engine on CUDA: torch ops and the Triton kernels (when kernels.backend imports) agree with the CPU path."""

from __future__ import annotations

import os

import pytest
import torch

from servescope.reference_engine.config import SpecConfig
from servescope.reference_engine.sequence import SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
# On trained weights: a local Llama-family checkpoint directory (config.json, safetensors,
# tokenizer) here runs the llama3-1b comparison on it instead of the preset's random weights, and adds
# the literal criterion, every prompt's greedy tokens identical for 32 steps. Random weights leave
# near-ties that part even the torch path from itself, and weights cannot be downloaded on CI.
CHECKPOINT = os.environ.get("SERVESCOPE_TEST_CHECKPOINT") or None
LITERAL_STEPS = 32


def _prompts(engine) -> list[list[int]]:
    words = [3, 20, 60, 9]
    return [engine.tokenizer.encode(" ".join(f"gpu{i}w{j}" for j in range(n))) for i, n in enumerate(words)]


def _outputs(engine_factory, min_preemptions: int = 0, **overrides) -> list[list[int]]:
    engine = engine_factory(dtype="float32", max_num_batched_tokens=128, **overrides)
    seqs = engine.generate(_prompts(engine), GREEDY)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert engine.scheduler.num_preemptions >= min_preemptions
    return [s.output_token_ids for s in seqs]


def test_cuda_torch_ops_match_cpu(engine_factory) -> None:
    assert _outputs(engine_factory, device="cuda", attention_backend="torch") == _outputs(engine_factory)


def test_cuda_triton_ops_match_torch_ops(engine_factory) -> None:
    pytest.importorskip("servescope.kernels.backend")
    expected = _outputs(engine_factory, device="cuda", attention_backend="torch")
    assert _outputs(engine_factory, device="cuda", attention_backend="triton") == expected
    # Preemption and speculation through the kernels keep the same greedy output.
    assert _outputs(engine_factory, device="cuda", attention_backend="triton", num_kv_blocks=32,
                    spec=SpecConfig(k=3), min_preemptions=1) == expected


def test_cuda_bfloat16_serves_the_1b_shape(engine_factory) -> None:
    from servescope.reference_engine.config import EngineConfig
    from servescope.reference_engine.engine import LLMEngine

    engine = LLMEngine.build(EngineConfig(device="cuda", kv_cache_memory=2 << 30), preset_name="llama3-1b")
    assert engine.dtype == torch.bfloat16
    seqs = engine.generate(_prompts(engine), SamplingParams(max_tokens=16, temperature=0.8, seed=3))
    assert all(s.num_output_tokens >= 1 for s in seqs)


def test_cuda_device_sampler_never_waits_for_the_gpu() -> None:
    """The overlapped step loop needs sampling that never blocks the host on the GPU: every mode
    (greedy, min_tokens masking, temperature, top-p, top-k) under CUDA's sync-debug mode "error"."""
    from servescope.reference_engine.sampler import DeviceSampler, SampleRequest
    from servescope.reference_engine.sequence import Sequence

    sampler = DeviceSampler((5, 9), torch.device("cuda"), seed=0)
    logits = torch.randn(6, 1000, device="cuda")
    knobs = [dict(temperature=0), dict(temperature=0, min_tokens=4), dict(temperature=1.0, min_tokens=4),
             dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=20),
             dict(temperature=0.8, top_k=20, top_p=0.5)]
    torch.cuda.synchronize()
    for params in (knobs, knobs[2:3] * 6, knobs[4:] * 3):  # mixed rows; every row sampled; all top-k
        requests = [SampleRequest(Sequence([1], SamplingParams(max_tokens=8, **k)), i, [])
                    for i, k in enumerate(params)]
        torch.cuda.set_sync_debug_mode("error")
        try:
            ids = sampler.sample(logits[:len(requests)].clone(), requests)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert ids.shape == (len(requests),) and ids.device.type == "cuda"


def test_cuda_engine_compiles_the_sampling_kernel_at_start_up(engine_factory) -> None:
    """A built engine has the sampling kernel compiled: its first sampled request compiles nothing
    (a compile mid-run stalls every request in flight for about a second)."""
    from servescope.kernels.sampling import _top_p_sample_kernel
    from servescope.reference_engine.sampler import SampleRequest
    from servescope.reference_engine.sequence import Sequence

    if not hasattr(_top_p_sample_kernel, "device_caches"):
        pytest.skip("this Triton keeps no per-device kernel cache to inspect")

    def compiled() -> int:
        return sum(len(entry[0]) for entry in _top_p_sample_kernel.device_caches.values())

    engine = engine_factory(device="cuda", dtype="float32")
    before = compiled()
    assert before >= 1
    vocab = engine.model_config.vocab_size
    for knobs in (dict(temperature=1.0), dict(temperature=0.7, top_p=0.9)):
        requests = [SampleRequest(Sequence([1], SamplingParams(max_tokens=4, **knobs)), i, []) for i in range(3)]
        engine.device_sampler.sample(torch.randn(3, vocab, device="cuda"), requests)
    assert compiled() == before


@pytest.mark.parametrize("overrides", [{"async_scheduling": False},
                                       {"spec": SpecConfig(k=3, adaptive=False), "async_scheduling": False}],
                         ids=["no-overlap", "speculative"])
def test_cuda_host_sampler_samples_on_the_device(engine_factory, overrides) -> None:
    """Without overlapped scheduling (and in steps that draft, which run alone) the host-side sampler
    draws on the CUDA logits, which stay on the device: unseeded and seeded requests together, the
    seeded ones reproducible (the fixed draft policy: adaptive drafting follows measured times)."""
    def run() -> list[list[int]]:
        engine = engine_factory(device="cuda", dtype="float32", **overrides)
        assert not engine.async_scheduling
        prompts = _prompts(engine)
        params = [SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True, seed=7 if i % 2 else None)
                  for i in range(len(prompts))]
        seqs = engine.generate(prompts, params)
        assert all(s.num_output_tokens == 12 for s in seqs)
        return [s.output_token_ids for i, s in enumerate(seqs) if i % 2]

    assert run() == run()


def _hook_sampling(engine, logits: dict, forced: list[list[int]] | None = None) -> None:
    """Keep every sampled row's logits (float32, on the CPU) under (request_id, output position);
    with `forced`, return those tokens instead of sampling (teacher forcing through the real path)."""
    def wrap(sample, on_host: bool):
        def hooked(rows, requests):
            host = rows.float().cpu()
            for req in requests:
                logits[(req.seq.request_id, req.seq.num_output_tokens)] = host[req.first_row].clone()
            if forced is None:
                return sample(rows, requests)
            tokens = [forced[int(req.seq.request_id)][req.seq.num_output_tokens] for req in requests]
            if on_host:
                return [[t] for t in tokens]
            return torch.tensor(tokens, dtype=torch.int64, device=rows.device)
        return hooked

    engine.sampler.sample = wrap(engine.sampler.sample, True)
    engine.device_sampler.sample = wrap(engine.device_sampler.sample, False)


def _engine_1b(**overrides):
    from servescope.reference_engine.config import EngineConfig
    from servescope.reference_engine.engine import LLMEngine

    fields = dict(device="cuda", kv_cache_memory=4 << 30, max_model_len=2048, max_num_seqs=16,
                  max_num_batched_tokens=512)
    fields.update(overrides)
    return LLMEngine.build(EngineConfig(**fields), preset_name="llama3-1b", model_path=CHECKPOINT)


def _run_1b(prompts, steps: int, forced=None, **overrides):
    engine = _engine_1b(**overrides)
    logits: dict = {}
    _hook_sampling(engine, logits, forced)
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    info = (engine.ops.name, engine.async_scheduling, engine.runner.num_graph_steps, engine.runner.num_eager_steps)
    outputs = [s.output_token_ids for s in seqs]
    del engine
    torch.cuda.empty_cache()
    return outputs, logits, info


def _run_1b_one_at_a_time(prompts, steps: int, **overrides) -> list[list[int]]:
    """Each prompt alone (batch 1 throughout): the same path meets other matrix shapes, so other
    accumulation orders; how often this parts from the batched run is the path's own noise floor."""
    engine = _engine_1b(**overrides)
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    outputs = []
    for i, prompt in enumerate(prompts):
        seq = engine.add_request(prompt, params, request_id=str(i))
        while engine.has_unfinished():
            engine.step()
        outputs.append(seq.output_token_ids)
    del engine
    torch.cuda.empty_cache()
    return outputs


def _first_divergence(a: list[list[int]], b: list[list[int]]) -> dict[int, int]:
    """prompt index -> first output step where the two runs' greedy tokens differ."""
    out = {}
    for i, (x, y) in enumerate(zip(a, b)):
        j = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if j is not None:
            out[i] = j
    return out


def _teacher_forced_fp32(prompts, outputs) -> dict:
    """float32 plain-torch logits at every output position of the given token sequences (the same
    weights: big presets draw them in bf16 precision), keyed like _hook_sampling."""
    engine = _engine_1b(dtype="float32", attention_backend="torch", cuda_graph=False, async_scheduling=False,
                        max_num_batched_tokens=4096)
    out = {}
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        seq = engine.add_request(prompt + output[:-1], SamplingParams(max_tokens=1, temperature=0))
        sched = engine.scheduler.schedule()
        input_ids, positions, meta, _, _ = engine.runner.prepare(sched)
        with torch.inference_mode():
            hidden = engine.model(engine.ops, input_ids, positions, engine.runner.kv_caches, meta)
            logits = engine.model.compute_logits(hidden[len(prompt) - 1:]).cpu()
        for j in range(len(output)):
            out[(str(i), j)] = logits[j]
        engine.abort(seq)
    del engine
    torch.cuda.empty_cache()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_llama3_1b_triton_path_matches_torch_path_bf16() -> None:
    """llama3-1b in bf16 through the GPU path (Triton kernels, CUDA graphs,
    overlapped scheduling) against the plain-torch path, 8 prompts x 40 greedy steps.

    - logits: against float32 logits of the same weights and tokens, the Triton path's error is no
      larger than the plain-torch bf16 path's own (both are bf16 models; neither is the truth);
    - greedy tokens: both paths free-running give the same tokens for 40 steps, except that a
      prompt may part ways at a near-tie: a step where the float32 margin between the two chosen
      tokens is within the bf16 paths' own logit error there (either choice is then correct);
    - teacher-forced through the Triton path along the torch path's tokens, its argmax equals the
      torch token at every one of the 320 steps, near-ties (same rule) excepted, and those are rare.

    The report also runs the torch path against itself, one prompt at a time instead of batched:
    other matrix shapes give other bf16 accumulation orders, and where that parts from the batched
    run is the noise floor any second path meets.

    With SERVESCOPE_TEST_CHECKPOINT set, the same runs use that checkpoint's weights and tokenizer,
    and every prompt must also stay identical for the first 32 steps (the item's literal criterion).
    """
    pytest.importorskip("servescope.kernels.backend")
    from servescope.reference_engine.tokenization import EngineTokenizer, tokenizer_dir_for

    tok = EngineTokenizer(tokenizer_dir_for(CHECKPOINT, None))
    # Mixed lengths: short prompts, ones ending mid-page and on page edges, and prompts longer than
    # the step budget (chunked prefill beside the others' decodes).
    gen = torch.Generator().manual_seed(5)
    lengths = [1, 7, 16, 33, 100, 257, 700, 1024]
    prompts = [torch.randint(10, tok.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    prompts[2] = tok.encode("The quick brown fox jumps over the lazy dog; paged attention keeps blocks")[:16]
    steps = 40
    ref, ref_logits, ref_info = _run_1b(prompts, steps, attention_backend="torch", cuda_graph=False,
                                        async_scheduling=False)
    got, got_logits, info = _run_1b(prompts, steps)
    alone = _run_1b_one_at_a_time(prompts, steps, attention_backend="torch", cuda_graph=False,
                                  async_scheduling=False)
    _, forced_logits, forced_info = _run_1b(prompts, steps, forced=ref)
    assert ref_info[:3] == ("torch", False, 0)
    for i in (info, forced_info):  # the GPU path did run graphs, overlapped
        assert i[0] == "triton" and i[1] and i[2] > 0, i
    fp32 = _teacher_forced_fp32(prompts, ref)
    keys = [(str(i), j) for i in range(len(prompts)) for j in range(steps)]

    def near_tie(key, a: int, b: int, *paths: dict) -> bool:
        margin = abs(float(fp32[key][a] - fp32[key][b]))
        noise = max(float((p[key][[a, b]] - fp32[key][[a, b]]).abs().max()) for p in paths)
        return margin <= 2 * noise

    # Logit accuracy on the same tokens.
    r = torch.stack([ref_logits[k] for k in keys])
    g = torch.stack([forced_logits[k] for k in keys])
    f = torch.stack([fp32[k] for k in keys])
    err_torch, err_triton, rel = _rel(r, f), _rel(g, f), _rel(g, r)
    report = (f"logits vs float32: torch bf16 {err_torch:.2e}, triton bf16 {err_triton:.2e}; triton vs torch "
              f"{rel:.2e}, max abs {(g - r).abs().max().item():.3f}")

    # Teacher-forced argmax agreement.
    mismatched = [k for k in keys if int(forced_logits[k].argmax()) != ref[int(k[0])][k[1]]]
    ties = [k for k in mismatched if near_tie(k, int(forced_logits[k].argmax()), ref[int(k[0])][k[1]],
                                              forced_logits, ref_logits)]
    # Free-running divergences.
    diverged = {}
    for i, j in _first_divergence(ref, got).items():
        key, a, b = (str(i), j), ref[i][j], got[i][j]
        diverged[i] = (j, near_tie(key, a, b, got_logits, ref_logits), abs(float(fp32[key][a] - fp32[key][b])))
    self_diverged = _first_divergence(ref, alone)
    report += (f"; teacher-forced argmax agrees at {len(keys) - len(mismatched)}/{len(keys)} steps "
               f"({len(ties)} of the misses near-ties); free-running identical for "
               f"{len(prompts) - len(diverged)}/{len(prompts)} prompts over {steps} steps, divergences "
               f"(step, near-tie, float32 margin): {diverged}; noise floor: the torch path batched against "
               f"itself one prompt at a time parts at (prompt: step) {self_diverged}")
    print(report)
    assert err_triton <= 1.25 * err_torch + 1e-3, report
    assert rel < 5e-2, report
    assert len(ties) == len(mismatched) and len(ties) <= 0.02 * len(keys), report
    for i, (j, tie, _) in diverged.items():
        assert tie, f"prompt {i} diverges at step {j} where the margin is not a near-tie: {report}"
    assert all(len(a) == steps for a in ref)
    if CHECKPOINT:
        early = {i: j for i, (j, _, _) in diverged.items() if j < LITERAL_STEPS}
        assert not early, f"{CHECKPOINT}: prompts part before step {LITERAL_STEPS} (prompt: step) {early}: {report}"
