"""Which prompts the engine can serve: one check shared by `LLMEngine` and the HTTP front end.

The front end rejects a bad prompt with a 400 before it ever reaches the engine;
when the engine runs in another process (`engine_process.py`) the front end has
no `LLMEngine` to ask, only these four numbers. Keeping the check here means the
two sides can never disagree about what fits. No torch import: the front end
process does not need it.
"""

from __future__ import annotations

from dataclasses import dataclass

from servescope.reference_engine.errors import InvalidRequest
from servescope.reference_engine.sequence import SamplingParams


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """The engine's fixed limits on one request: token ids, context length and KV pool size."""

    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """InvalidRequest (naming the OpenAI field and code) when the request cannot be served."""
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt_token_ids)} in the prompt, "
                f"{params.max_tokens} for the completion). Reduce the prompt or max_tokens.",
                "prompt", "context_length_exceeded")
        blocks = -(-total // self.block_size)
        if blocks > self.num_blocks:
            raise InvalidRequest(f"the request needs {blocks} KV blocks but the whole cache has "
                                 f"{self.num_blocks}; shorten it or start the engine with more KV memory",
                                 "prompt", "kv_cache_too_small")
