"""Top-p (nucleus) sampling with temperature, without sorting the vocabulary.

The plain-torch way (`top_p_probs_ref`, as `DeviceSampler` does it) sorts every row of the
vocabulary (128,256 ids for llama3), takes a cumulative sum and scatters the mask back: several
full passes plus a segmented sort per step. This kernel samples the same distribution by
rejection, one program per row, reading the row from memory only a few times:

1. the row's max and softmax normalizer (two passes);
2. a round: draw a token from p restricted to {s > low} (exponential race: the argmax of
   s - log E with E ~ Exp(1), which samples p renormalized over that set), then sum the mass
   of the tokens scored strictly above it. If that mass is at most top_p the token is in the
   nucleus: accept it. Otherwise every token scored at or below it is outside the nucleus too:
   raise `low` to its score and draw again.

Each round's draw, conditioned on landing in the nucleus, is p renormalized over the nucleus
(the candidate set always contains it), so the accepted token has exactly the reference's
distribution. A rejection removes at least the rejected token and everything below it; rounds
are few (a handful on flat random-weight logits, one when the nucleus holds most of the mass).
After MAX_ROUNDS rejections (not reached in the tests) it returns the row's argmax.

Ties: the reference keeps a token when the mass ranked strictly before it in a sorted order is at
most top_p; here, when the mass scored strictly above it is. They differ only among tokens with
equal scores.

Whether this pays against the sorting path on a given GPU is what `benchmarks/sampling.py`
measures; the engine does not use it until it does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import check_same_device, check_shape

MAX_ROUNDS = 32
BLOCK = 1024


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
def _top_p_sample_kernel(
    logits_ptr, stride_row, inv_temp_ptr, top_p_ptr, seed_ptr, out_ptr, vocab,
    MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    inv_t = tl.load(inv_temp_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK)

    # The row's max score and softmax normalizer (scores s = logits / T).
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + cols
        s = _scores(base, offs, vocab, inv_t)
        best = tl.maximum(best, s)
    m = tl.max(best, axis=0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + cols
        s = _scores(base, offs, vocab, inv_t)
        acc += tl.exp(s - m)
    z = tl.sum(acc, axis=0)

    low = float("-inf")  # candidates score strictly above this
    chosen = -1
    r = 0
    while (chosen < 0) & (r < MAX_ROUNDS):
        # Exponential race over {s > low}: argmax of s - log(E), E = -log(U).
        win_key = tl.full([BLOCK], float("-inf"), tl.float32)
        win_idx = tl.zeros([BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            s = _scores(base, offs, vocab, inv_t)
            u = tl.rand(seed, (row * MAX_ROUNDS + r) * vocab + offs)
            e = -tl.log(tl.maximum(u, 1e-20))
            key = tl.where((offs < vocab) & (s > low), s - tl.log(e), float("-inf"))
            better = key > win_key
            win_key = tl.where(better, key, win_key)
            win_idx = tl.where(better, offs, win_idx)
        top = tl.max(win_key, axis=0)
        j = tl.min(tl.where(win_key == top, win_idx, vocab), axis=0)
        s_j = tl.load(base + j).to(tl.float32) * inv_t
        # Mass scored strictly above the drawn token.
        above = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            s = _scores(base, offs, vocab, inv_t)
            above += tl.where(s > s_j, tl.exp(s - m), 0.0)
        if tl.sum(above, axis=0) <= top_p * z:
            chosen = j
        else:
            low = s_j
        r += 1
    if chosen < 0:  # MAX_ROUNDS rejections: the argmax is always in the nucleus
        arg = tl.zeros([BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            s = _scores(base, offs, vocab, inv_t)
            arg = tl.where(s == m, offs, arg)
        chosen = tl.max(arg, axis=0)
    tl.store(out_ptr + row, chosen.to(tl.int64))


def top_p_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                 seed: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [R, V] from softmax(logits / T) cut to its top_p nucleus.

    temperature and top_p: [R] (temperature > 0; top_p in (0, 1]). seed: a one-element int64
    tensor on the same device, read by the kernel (so drawing it needs no host sync). Returns [R]
    int64 on the logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab]; got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    check_shape("temperature", temperature, (rows,))
    check_shape("top_p", top_p, (rows,))
    check_same_device(logits=logits, temperature=temperature, top_p=top_p, seed=seed)
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    if rows * MAX_ROUNDS * vocab >= 2**31:
        raise ValueError(f"{rows} rows x {vocab} ids is too many for one launch (random offsets are int32): "
                         "split the rows")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    inv_temp = (1.0 / temperature.float()).contiguous()
    _top_p_sample_kernel[(rows,)](
        logits, logits.stride(0), inv_temp, top_p.float().contiguous(), seed, out, vocab,
        MAX_ROUNDS=MAX_ROUNDS, BLOCK=min(BLOCK, triton.next_power_of_2(vocab)), num_warps=4,
    )
    return out
