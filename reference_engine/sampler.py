"""Turn logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, and draft verification.

Each sequence owns a run of logit rows: one for a plain decode or prefill end,
1 + k when it carries k speculative draft tokens. Drafts are verified against
those rows in one pass: greedy keeps drafts while they equal the argmax (so the
output is identical to decoding without speculation); sampled requests use
rejection sampling against the one-hot n-gram proposal (accept draft d with
probability p(d), else sample from p with d removed), which keeps the output
distribution exactly the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from servescope.reference_engine.sequence import Sequence


@dataclass(slots=True)
class SampleRequest:
    seq: Sequence
    first_row: int
    drafts: list[int]


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.seed = seed
        # One generator per device, for requests without their own seed: torch draws only with a
        # generator on the tensor's device, and on a GPU the logits stay there (ModelRunner.run).
        self._shared: dict[torch.device, torch.Generator] = {}
        self._eos_index: dict[torch.device, Tensor] = {}  # EOS ids on each device, for masking

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        if seq.params.seed is None:
            gen = self._shared.get(device)
            if gen is None:
                gen = self._shared[device] = torch.Generator(device=device).manual_seed(self.seed)
            return gen
        if seq.generator is None or seq.generator.device != device:
            seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
        return seq.generator

    def _mask_eos(self, logits: Tensor, requests: list[SampleRequest]) -> None:
        """min_tokens: EOS cannot be chosen before the request has produced that many tokens."""
        if not self.eos_token_ids:
            return
        for req in requests:
            short = req.seq.params.min_tokens - req.seq.num_output_tokens
            if short > 0:
                rows = min(short, len(req.drafts) + 1)
                eos = self._eos_index.get(logits.device)
                if eos is None:  # once per device: creating it copies from the host
                    eos = self._eos_index[logits.device] = torch.tensor(self.eos_token_ids, device=logits.device)
                # index_fill_ takes the value as a scalar: `logits[rows, eos] = x` would copy it to
                # a GPU from pageable memory, a wait per request (see DeviceSampler).
                logits[req.first_row:req.first_row + rows].index_fill_(1, eos, float("-inf"))

    def _probs(self, logits: Tensor, seq: Sequence) -> Tensor:
        """Sampling distribution of rows [R, V] after temperature, top-k and top-p."""
        params = seq.params
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cum = sorted_probs.cumsum(-1)
            drop_sorted = cum - sorted_probs > params.top_p  # keep the smallest set reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    @torch.inference_mode()
    def sample(self, logits: Tensor, requests: list[SampleRequest]) -> list[list[int]]:
        """For each request: its accepted draft tokens followed by one newly sampled token."""
        self._mask_eos(logits, requests)
        argmax = logits.argmax(dim=-1).tolist()
        results: list[list[int] | None] = [None] * len(requests)
        # Unseeded, draft-free rows with the same knobs share one softmax and one multinomial call:
        # per-row calls cost more than the tiny model's whole decode step at batch 32.
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, req in enumerate(requests):
            params = req.seq.params
            if params.greedy:
                results[i] = self._verify_greedy(argmax, req)
            elif params.seed is None and not req.drafts:
                groups.setdefault((params.temperature, params.top_k, params.top_p), []).append(i)
            else:
                results[i] = self._verify_sampled(logits, req)
        for members in groups.values():
            rows = torch.tensor([requests[i].first_row for i in members], device=logits.device)
            first = requests[members[0]].seq
            probs = self._probs(logits.index_select(0, rows), first)
            tokens = torch.multinomial(probs, 1, generator=self._generator(first, logits.device)).view(-1).tolist()
            for i, token in zip(members, tokens):
                results[i] = [token]
        return results  # type: ignore[return-value]

    @staticmethod
    def _verify_greedy(argmax: list[int], req: SampleRequest) -> list[int]:
        out: list[int] = []
        for i, draft in enumerate(req.drafts):
            target = argmax[req.first_row + i]
            out.append(target)
            if target != draft:
                return out
        out.append(argmax[req.first_row + len(req.drafts)])
        return out

    def _verify_sampled(self, logits: Tensor, req: SampleRequest) -> list[int]:
        gen = self._generator(req.seq, logits.device)
        rows = len(req.drafts) + 1
        probs = self._probs(logits[req.first_row:req.first_row + rows], req.seq)
        out: list[int] = []
        for i, draft in enumerate(req.drafts):
            p = probs[i]
            if torch.rand((), generator=gen, device=gen.device).item() < p[draft].item():
                out.append(draft)
                continue
            residual = p.clone()
            residual[draft] = 0.0
            if residual.sum() <= 0:  # p was one-hot on the draft: cannot happen after a rejection
                residual = p
            out.append(int(torch.multinomial(residual, 1, generator=gen)))
            return out
        out.append(int(torch.multinomial(probs[rows - 1], 1, generator=gen)))
        return out


class DeviceSampler:
    """Sampling that stays on the logits' device and never reads back to the host.

    For the GPU step loop: the sampled ids stay on the GPU (the next step's inputs are gathered from
    them there) and the host copies them back one step later. Handles greedy, temperature, top-k,
    top-p and min_tokens for one token per request; requests with their own seed or with
    speculative drafts need the host `Sampler` (`supports` says which). Random draws use the
    exponential-race form of sampling (argmax of p / E with E ~ Exp(1)), which needs no host sync.
    """

    # Top-k rows take torch.topk (a selection, not a full sort) when every k is at most this.
    TOP_K_SELECT_MAX = 1024
    # Temperature alone takes the kernel from this many rows: below it the torch ops (softmax,
    # exponential draw, argmax) measured faster on an H200 (sampling_nvidia_h200.json).
    TEMPERATURE_KERNEL_MIN_ROWS = 64

    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device, seed: int = 0,
                 sampling_kernel: bool | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.int64, device=device)
        # The masking value as a device tensor: `logits[i, j] = float("-inf")` copies the scalar
        # from pageable host memory, which waits for the GPU to finish the step in flight and so
        # undoes overlapped scheduling (tests/reference_engine/test_gpu.py runs under sync-debug "error").
        self._neg_inf = torch.tensor(float("-inf"), device=device)
        # Rows without top-k (temperature, top-p) through kernels/sampling.py: no sort, one pass
        # for temperature alone. By default on CUDA, where benchmarks/sampling.py measured it
        # faster than the torch ops (top-p at every batch size, temperature alone from 64 rows).
        self.sampling_kernel = device.type == "cuda" if sampling_kernel is None else sampling_kernel

    def warm_up(self, vocab: int) -> None:
        """Compile the sampling kernel now, at start-up: its first use would otherwise stall the
        step loop (and every request in flight) for the second Triton takes to compile it."""
        if self.sampling_kernel:
            from servescope.kernels.sampling import top_p_sample

            ones = torch.ones(1, device=self.device)
            top_p_sample(torch.zeros(1, vocab, device=self.device), ones, ones * 0.5,
                         torch.zeros(1, dtype=torch.int64, device=self.device))

    @staticmethod
    def supports(requests: list[SampleRequest]) -> bool:
        return all(not req.drafts and req.seq.params.seed is None for req in requests)

    def _upload(self, values: list, dtype: torch.dtype) -> Tensor:
        host = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    @torch.inference_mode()
    def sample(self, logits: Tensor, requests: list[SampleRequest]) -> Tensor:
        """logits [R, V] (one row per request, in order) -> sampled ids [R] int64 on the same device."""
        if self.eos_token_ids:
            short = [i for i, req in enumerate(requests)
                     if req.seq.params.min_tokens > req.seq.num_output_tokens]
            if short:
                rows = self._upload(short, torch.int64)
                logits.index_put_((rows[:, None], self._eos[None, :]), self._neg_inf)
        sampled_rows = [i for i, req in enumerate(requests) if not req.seq.params.greedy]
        if not sampled_rows:
            return logits.argmax(dim=-1)
        params = [requests[i].seq.params for i in sampled_rows]
        if len(sampled_rows) == len(requests):  # no greedy row: sample every row in place
            rows, sub = None, logits
        else:
            rows = self._upload(sampled_rows, torch.int64)
            sub = logits.index_select(0, rows)
        temps = self._upload([p.temperature for p in params], torch.float32)
        top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
        top_p = [p.top_p for p in params]
        if self.sampling_kernel and not any(top_k) and (
                any(p < 1.0 for p in top_p) or len(params) >= self.TEMPERATURE_KERNEL_MIN_ROWS):
            from servescope.kernels.sampling import top_p_sample

            seed = torch.randint(0, 2**31 - 1, (1,), generator=self.generator, device=self.device)
            choice = top_p_sample(sub.contiguous(), temps, self._upload(top_p, torch.float32), seed)
        elif all(top_k) and max(top_k) <= self.TOP_K_SELECT_MAX:
            choice = self._sample_top_k(sub, temps, top_k, top_p)
        else:
            choice = self._sample_sorted(sub, temps, top_k, top_p)
        return choice if rows is None else logits.argmax(dim=-1).index_copy(0, rows, choice)

    def _sample_sorted(self, sub: Tensor, temps: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
        """The general path (any mix of top-k and top-p rows): sort each row, cut, race."""
        sub = sub / temps[:, None]
        if any(top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = sub.sort(dim=-1, descending=True)
            vocab = sub.shape[-1]
            if any(top_k):
                k = self._upload([k if k > 0 else vocab for k in top_k], torch.int64)
                kth = sorted_logits.gather(1, (k.clamp(max=vocab) - 1)[:, None])
                sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
            if any(p < 1.0 for p in top_p):
                probs_sorted = sorted_logits.softmax(dim=-1)
                cum = probs_sorted.cumsum(dim=-1)
                limit = self._upload(top_p, torch.float32)
                drop = (cum - probs_sorted) > limit[:, None]  # keep the smallest prefix reaching top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            sub = torch.full_like(sub, float("-inf")).scatter_(1, order, sorted_logits)
        return self._race(sub)

    def _race(self, scores: Tensor) -> Tensor:
        """One draw per row from softmax(scores): the argmax of p / E, E ~ Exp(1) (no host sync)."""
        probs = scores.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        return probs.div_(race).argmax(dim=-1)

    def _sample_top_k(self, sub: Tensor, temps: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
        """Top-k (then top-p) rows, every k > 0: select the max(k) best ids per row with torch.topk
        (sorted) and sample within them, instead of sorting the whole vocabulary. Keeps exactly k
        ids where the sorting path also keeps ties with the k-th score."""
        width = min(max(top_k), sub.shape[-1])
        values, ids = sub.topk(width, dim=-1)
        values = values / temps[:, None]
        k = self._upload(top_k, torch.int64)
        values = values.masked_fill(torch.arange(width, device=sub.device)[None, :] >= k[:, None], float("-inf"))
        if any(p < 1.0 for p in top_p):
            probs_sorted = values.softmax(dim=-1)
            limit = self._upload(top_p, torch.float32)
            drop = (probs_sorted.cumsum(dim=-1) - probs_sorted) > limit[:, None]
            values = values.masked_fill(drop, float("-inf"))
        return ids.gather(1, self._race(values)[:, None])[:, 0]
