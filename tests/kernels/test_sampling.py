"""kernels/sampling.py: rejection top-p sampling draws exactly the reference's nucleus distribution."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from servescope.kernels.sampling import BLOCK, top_p_probs_ref, top_p_sample

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernel on Triton's interpreter


def _draws(logits_row: torch.Tensor, temperature: float, top_p: float, n: int, seed: int) -> torch.Tensor:
    """n independent draws for one row: the row repeated n times in one launch (each row its own
    random stream)."""
    logits = logits_row.to(DEVICE).expand(n, -1).contiguous()
    temps = torch.full((n,), temperature, device=DEVICE)
    tops = torch.full((n,), top_p, device=DEVICE)
    return top_p_sample(logits, temps, tops, torch.tensor([seed], device=DEVICE)).cpu()


@pytest.mark.parametrize("vocab,temperature,top_p", [(48, 0.7, 0.8), (300, 1.3, 0.5), (BLOCK + 37, 1.0, 0.9),
                                                     (BLOCK + 37, 1.2, 1.0)])
def test_draws_follow_the_nucleus_distribution(vocab, temperature, top_p):
    """Against the reference distribution: nothing outside the nucleus, and frequencies inside it
    pass a chi-square test. Vocabularies below, across and beyond one block; top_p = 1 is the
    one-pass temperature-only path."""
    gen = torch.Generator().manual_seed(vocab)
    row = torch.randn(vocab, generator=gen) * 2.0
    probs = top_p_probs_ref(row[None], torch.tensor([temperature]), torch.tensor([top_p]))[0].double()
    n = 4000 if DEVICE == "cuda" else 250  # the interpreter runs one program at a time
    draws = _draws(row, temperature, top_p, n, seed=7)
    counts = torch.bincount(draws, minlength=vocab).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the nucleus was drawn"
    expected = probs[support] * n
    # Merge the rarest tokens into one bin so every expected count is at least 5.
    order = expected.argsort()
    merged_exp, merged_obs, acc_e, acc_o = [], [], 0.0, 0.0
    for i in order.tolist():
        acc_e += expected[i].item()
        acc_o += counts[support][i].item()
        if acc_e >= 5:
            merged_exp.append(acc_e)
            merged_obs.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e and merged_exp:
        merged_exp[-1] += acc_e
        merged_obs[-1] += acc_o
    assert len(merged_exp) >= 3, "the test needs a nucleus of several tokens"
    scale = sum(merged_obs) / sum(merged_exp)  # equal totals to the last bit, as chisquare demands
    assert chisquare(merged_obs, [e * scale for e in merged_exp]).pvalue > 1e-3, (merged_obs, merged_exp)


def test_temperature_alone_draws_the_softmax():
    """top_p = 1 takes the one-pass Gumbel-max path: one token 3 above eleven others wins with
    softmax's 0.646. (Exponential noise in place of Gumbel noise would make it 0.766.)"""
    row = torch.tensor([0.0] + [-3.0] * 11)
    n = 2000 if DEVICE == "cuda" else 500
    share = (_draws(row, 1.0, 1.0, n, seed=9) == 0).double().mean().item()
    expected = torch.softmax(row, -1)[0].item()
    assert abs(share - expected) < 4 * (expected * (1 - expected) / n) ** 0.5, (share, expected)


def test_extreme_settings():
    """top_p near 0 keeps only the argmax; top_p = 1 keeps every token (all get drawn when flat)."""
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(64, generator=gen)
    assert (_draws(row, 1.0, 1e-6, 100, seed=1) == row.argmax()).all()
    flat = torch.zeros(8)
    assert set(_draws(flat, 1.0, 1.0, 200, seed=2).tolist()) == set(range(8))


def test_rows_keep_their_own_settings():
    """One launch, rows with different temperatures and top_p: each row stays in its own nucleus."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 200, generator=gen) * 3
    temps = torch.tensor([0.5, 1.0, 2.0, 0.8, 1.5, 1.0])
    tops = torch.tensor([0.3, 0.9, 0.6, 1.0, 0.05, 0.75])
    probs = top_p_probs_ref(logits, temps, tops)
    for seed in range(20):
        ids = top_p_sample(logits.to(DEVICE), temps.to(DEVICE), tops.to(DEVICE),
                           torch.tensor([seed], device=DEVICE)).cpu()
        assert (probs[torch.arange(6), ids] > 0).all(), (seed, ids)


def test_same_seed_same_draws_and_bad_input():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 100, generator=gen).to(DEVICE)
    t, p = torch.ones(4, device=DEVICE), torch.full((4,), 0.9, device=DEVICE)
    seed = torch.tensor([11], device=DEVICE)
    assert torch.equal(top_p_sample(logits, t, p, seed), top_p_sample(logits, t, p, seed))
    with pytest.raises(ValueError, match="temperature"):
        top_p_sample(logits, t[:3], p, seed)
    with pytest.raises(ValueError, match="rows, vocab"):
        top_p_sample(logits[0], t, p, seed)


def test_device_sampler_routes_top_p_rows_through_the_kernel():
    """DeviceSampler(sampling_kernel=True): top-p rows come from the kernel (inside their nucleus, and
    different draws from the sorting path's), greedy rows stay argmax, min_tokens still masks EOS."""
    from servescope.reference_engine.sampler import DeviceSampler, SampleRequest
    from servescope.reference_engine.sequence import SamplingParams, Sequence

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 300, generator=gen) * 2
    logits[:, 7] = 50.0  # EOS would win every row without the min_tokens mask
    params = [SamplingParams(max_tokens=8, temperature=0.0, min_tokens=2),
              SamplingParams(max_tokens=8, temperature=0.9, top_p=0.7, min_tokens=2),
              SamplingParams(max_tokens=8, temperature=1.2, top_p=0.3, min_tokens=2),
              SamplingParams(max_tokens=8, temperature=0.8, min_tokens=2)]
    requests = [SampleRequest(Sequence([1], p), i, []) for i, p in enumerate(params)]
    masked = logits.clone()
    masked[:, 7] = float("-inf")
    nucleus = top_p_probs_ref(masked[1:3], torch.tensor([0.9, 1.2]), torch.tensor([0.7, 0.3]))
    kernel_path = DeviceSampler((7,), torch.device(DEVICE), seed=0, sampling_kernel=True)
    torch_path = DeviceSampler((7,), torch.device(DEVICE), seed=0, sampling_kernel=False)
    differs = False
    for _ in range(5):
        ids = kernel_path.sample(logits.clone().to(DEVICE), requests).cpu()
        assert ids[0] == masked[0].argmax() and ids[3] != 7
        assert (nucleus[torch.arange(2), ids[1:3]] > 0).all(), ids
        differs |= not torch.equal(ids, torch_path.sample(logits.clone().to(DEVICE), requests).cpu())
    assert differs  # the kernel did run: its random stream is not the sorting path's


def test_temperature_alone_takes_the_kernel_only_at_large_batches():
    """Temperature-only batches below DeviceSampler.TEMPERATURE_KERNEL_MIN_ROWS stay on the torch
    ops (the same draws as the torch path from the same seed); from that many rows on, the kernel."""
    from servescope.reference_engine.sampler import DeviceSampler, SampleRequest
    from servescope.reference_engine.sequence import SamplingParams, Sequence

    def draws(rows: int, kernel: bool) -> torch.Tensor:
        logits = torch.randn(rows, 300, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
        requests = [SampleRequest(Sequence([1], SamplingParams(max_tokens=8, temperature=0.9)), i, [])
                    for i in range(rows)]
        return DeviceSampler((), torch.device(DEVICE), seed=0, sampling_kernel=kernel).sample(logits, requests).cpu()

    small, large = DeviceSampler.TEMPERATURE_KERNEL_MIN_ROWS - 1, DeviceSampler.TEMPERATURE_KERNEL_MIN_ROWS
    assert torch.equal(draws(small, kernel=True), draws(small, kernel=False))
    assert not torch.equal(draws(large, kernel=True), draws(large, kernel=False))
