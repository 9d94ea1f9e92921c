"""A real Hugging Face tokenizer folder built by the tests (not the bundled one).

A small byte-level BPE trained with `tokenizers` on generated text, with a
ChatML-style template (different framing from the bundled Llama-3-like one) and
a BOS that the post-processor adds, like Llama tokenizers do.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("request token server latency queue batch cache prefix model decode prefill kernel memory block "
         "the a of to and in is for with on that by this be are from or as at it an").split()


def _training_text(n_lines: int = 1500) -> list[str]:
    rng = random.Random(5)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))).capitalize() + "."

    return [" ".join(sentence() for _ in range(3)) for _ in range(n_lines)]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
