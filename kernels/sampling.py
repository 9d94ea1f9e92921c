"""Temperature and top-p (nucleus) sampling, without sorting the vocabulary.

The plain-torch way (`top_p_probs_ref`, as `DeviceSampler` does it) sorts every row of the
vocabulary (128,256 ids for llama3), takes a cumulative sum and scatters the mask back: several
full passes plus a segmented sort per step. This kernel samples the same distribution by
rejection, one program per row, reading the row from memory only a few times:

1. the row's max and softmax normalizer (two passes);
2. a draw from p restricted to {s > low} (exponential race: the argmax of p / E with
   E ~ Exp(1), which samples p renormalized over that set; low starts at -inf);
3. a test: the mass of the tokens scored strictly above the drawn one. If it is at most top_p
   the token is in the nucleus: accept it. Otherwise every token scored at or below it is
   outside the nucleus too: raise `low` to its score and draw again. One pass does the test of
   one draw and the next draw, so a row costs 3 passes plus one per rejection.

Each round's draw, conditioned on landing in the nucleus, is p renormalized over the nucleus
(the candidate set always contains it), so the accepted token has exactly the reference's
distribution. A rejection removes at least the rejected token and everything below it; rounds
are few (a handful on flat random-weight logits, one when the nucleus holds most of the mass).
After MAX_ROUNDS rejections (not reached in the tests) it returns the row's argmax.

A row with top_p = 1 (temperature alone, the OpenAI API's default) skips all of that: one pass,
the argmax of s - log E (a Gumbel-max draw), needs neither the max nor the normalizer.

Ties: the reference keeps a token when the mass ranked strictly before it in a sorted order is at
most top_p; here, when the mass scored strictly above it is. They differ only among tokens with
equal scores.

`benchmarks/sampling.py` times it against the torch ops; `DeviceSampler` uses it on CUDA for
rows without top-k (temperature alone from 64 rows, where it measured faster).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from servescope.kernels.common import check_same_device, check_shape

MAX_ROUNDS = 32
BLOCK = 4096  # scores per block; see launch_config


def top_p_probs_ref(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The distribution each row samples from [R, V] (float32): softmax(logits / T), then the
    smallest set of highest-probability tokens whose mass reaches top_p, renormalized."""
    scaled = logits.float() / temperature.float()[:, None]
    probs = scaled.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cum = sorted_probs.cumsum(dim=-1)
    drop_sorted = (cum - sorted_probs) > top_p.float()[:, None]  # mass ranked before a token > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


@triton.jit
def _scores(base, offs, vocab, inv_t):
    """One block of the row's scores, logits / T (-inf past the vocabulary)."""
    return tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) * inv_t


@triton.jit
def _race_quarter(base, offs, vocab, inv_t, m, low, high, u, above, win_key, win_idx):
    """One quarter-block of a round: add the mass scored above `high` to `above`, and enter the
    tokens scored above `low` in the exponential race (key p / E, E = -log U ~ Exp(1); the
    largest key is a draw from p renormalized over those tokens). p = exp(s - m) serves both."""
    s = _scores(base, offs, vocab, inv_t)
    p = tl.exp(s - m)
    above += tl.where(s > high, p, 0.0)
    key = tl.where(s > low, p / -tl.log(tl.maximum(u, 1e-20)), -1.0)
    better = key > win_key
    return above, tl.where(better, key, win_key), tl.where(better, offs, win_idx)


@triton.jit
def _race(base, vocab, inv_t, m, low, high, seed, r, BLOCK: tl.constexpr):
    """One pass over the row: the race winner among tokens scored above `low` (round r's random
    numbers) and the mass scored above `high`. Returns (winner, its score, mass above high).

    Uniforms come four per Philox call (tl.rand4x), one for each quarter of the block: the
    generator is most of a pass's arithmetic, so this quarters it."""
    QUARTER: tl.constexpr = BLOCK // 4
    cols = tl.arange(0, QUARTER)
    above = tl.zeros([QUARTER], tl.float32)
    win_key = tl.full([QUARTER], -2.0, tl.float32)
    win_idx = tl.zeros([QUARTER], tl.int32)
    counters = tl.cdiv(vocab, 4)  # per round, so every (round, token) gets its own uniform
    for start in range(0, vocab, BLOCK):
        u0, u1, u2, u3 = tl.rand4x(seed, r * counters + start // 4 + cols)
        offs = start + cols
        above, win_key, win_idx = _race_quarter(base, offs, vocab, inv_t, m, low, high, u0,
                                                above, win_key, win_idx)
        above, win_key, win_idx = _race_quarter(base, offs + QUARTER, vocab, inv_t, m, low, high, u1,
                                                above, win_key, win_idx)
        above, win_key, win_idx = _race_quarter(base, offs + 2 * QUARTER, vocab, inv_t, m, low, high, u2,
                                                above, win_key, win_idx)
        above, win_key, win_idx = _race_quarter(base, offs + 3 * QUARTER, vocab, inv_t, m, low, high, u3,
                                                above, win_key, win_idx)
    top = tl.max(win_key, axis=0)
    j = tl.min(tl.where(win_key == top, win_idx, vocab), axis=0)
    j = tl.minimum(j, vocab - 1)  # an empty race (nothing above low) is never accepted or used
    s_j = tl.load(base + j).to(tl.float32) * inv_t
    return j, s_j, tl.sum(above, axis=0)


@triton.jit
def _gumbel_quarter(base, offs, vocab, inv_t, u, win_key, win_idx):
    key = _scores(base, offs, vocab, inv_t) - tl.log(-tl.log(tl.maximum(u, 1e-20)))
    better = key > win_key
    return tl.where(better, key, win_key), tl.where(better, offs, win_idx)


@triton.jit
def _gumbel_race(base, vocab, inv_t, seed, BLOCK: tl.constexpr):
    """A draw from softmax(s) in one pass: argmax of s - log E with E ~ Exp(1) needs neither the
    max nor the normalizer (the log form, since exp(s) alone could overflow)."""
    QUARTER: tl.constexpr = BLOCK // 4
    cols = tl.arange(0, QUARTER)
    win_key = tl.full([QUARTER], float("-inf"), tl.float32)
    win_idx = tl.zeros([QUARTER], tl.int32)
    for start in range(0, vocab, BLOCK):
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + cols)
        offs = start + cols
        win_key, win_idx = _gumbel_quarter(base, offs, vocab, inv_t, u0, win_key, win_idx)
        win_key, win_idx = _gumbel_quarter(base, offs + QUARTER, vocab, inv_t, u1, win_key, win_idx)
        win_key, win_idx = _gumbel_quarter(base, offs + 2 * QUARTER, vocab, inv_t, u2, win_key, win_idx)
        win_key, win_idx = _gumbel_quarter(base, offs + 3 * QUARTER, vocab, inv_t, u3, win_key, win_idx)
    top = tl.max(win_key, axis=0)
    return tl.min(tl.where(win_key == top, win_idx, vocab), axis=0)


@triton.jit
def _top_p_sample_kernel(
    logits_ptr, stride_row, inv_temp_ptr, top_p_ptr, seed_ptr, out_ptr, vocab,
    MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    inv_t = tl.load(inv_temp_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    seed = tl.load(seed_ptr) + row  # each row its own Philox key, so counters stay small
    cols = tl.arange(0, BLOCK)

    if top_p >= 1.0:  # temperature alone: one pass, a Gumbel-max race (argmax of s - log E)
        chosen = _gumbel_race(base, vocab, inv_t, seed, BLOCK)
    else:
        # The row's max score and softmax normalizer (scores s = logits / T).
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            best = tl.maximum(best, _scores(base, start + cols, vocab, inv_t))
        m = tl.max(best, axis=0)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            acc += tl.exp(_scores(base, start + cols, vocab, inv_t) - m)
        z = tl.sum(acc, axis=0)

        # Round 0's draw over every token; then each pass tests the current draw (the mass
        # scored above it) and, in the same pass, draws the next round's candidate from the
        # tokens scored above it, the set left if the test rejects. The next draw uses its own
        # random numbers, so drawing it before the test changes nothing about the distribution.
        j, s_j, _ = _race(base, vocab, inv_t, m, float("-inf"), float("inf"), seed, 0, BLOCK)
        chosen = -1
        r = 1
        while (chosen < 0) & (r <= MAX_ROUNDS):
            j_next, s_next, above = _race(base, vocab, inv_t, m, s_j, s_j, seed, r, BLOCK)
            if above <= top_p * z:
                chosen = j
            else:
                j = j_next
                s_j = s_next
            r += 1
        if chosen < 0:  # MAX_ROUNDS rejections: the argmax is always in the nucleus
            arg = tl.zeros([BLOCK], tl.int32)
            for start in range(0, vocab, BLOCK):
                offs = start + cols
                arg = tl.where(_scores(base, offs, vocab, inv_t) == m, offs, arg)
            chosen = tl.max(arg, axis=0)
    tl.store(out_ptr + row, chosen.to(tl.int64))


def launch_config(rows: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a launch of `rows` rows. One program samples one row, so at small
    batches each program's own speed is the latency: 16 warps over 4096-wide blocks.
    `python -m benchmarks.sampling --sweep` times every (block, warps) pair tried on the device
    (sampling_nvidia_h200.json, part kernel-sweep); 4 warps over 1024 is 2-3x slower there."""
    return BLOCK, 16


def top_p_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                 seed: torch.Tensor, block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """One token per row of logits [R, V] from softmax(logits / T) cut to its top_p nucleus.

    temperature and top_p: [R] (temperature > 0; top_p in (0, 1]). seed: a one-element int64
    tensor on the same device, read by the kernel (so drawing it needs no host sync). Returns [R]
    int64 on the logits' device. block and num_warps override `launch_config` (for sweeps).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab]; got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    check_shape("temperature", temperature, (rows,))
    check_shape("top_p", top_p, (rows,))
    check_same_device(logits=logits, temperature=temperature, top_p=top_p, seed=seed)
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    if (MAX_ROUNDS + 1) * vocab >= 2**31:
        raise ValueError(f"a vocabulary of {vocab} ids is too large (random counters are int32)")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    default_block, default_warps = launch_config(rows)
    block = max(16, min(block or default_block, triton.next_power_of_2(vocab)))
    inv_temp = (1.0 / temperature.float()).contiguous()
    _top_p_sample_kernel[(rows,)](
        logits, logits.stride(0), inv_temp, top_p.float().contiguous(), seed, out, vocab,
        MAX_ROUNDS=MAX_ROUNDS, BLOCK=block, num_warps=num_warps or default_warps,
    )
    return out
