"""Real Hugging Face tokenizer folders built by the tests (not the bundled one), one per family.

- `hf_tokenizer_dir`: a small byte-level BPE trained on generated text, with a ChatML-style
  template (different framing from the bundled Llama-3-like one) and a BOS that the
  post-processor adds, like Llama tokenizers do.
- `bytelevel_tokenizer_dir`: a 2,048-token byte-level BPE with a `<|role|>` template. It is
  trained on lower-case text, so no merge ever saw a space before a capital letter: the
  space between two sentences is a token of its own, and every sentence starts, in context,
  with that same token.
- `wordpiece_tokenizer_dir`: a BERT-style WordPiece (lower-casing normalizer, [CLS] before
  and [SEP] after every completions prompt, a decoder that does not give back the text) with
  a template that writes a default system prompt when the messages bring none.
- `unigram_tokenizer_dir`: a SentencePiece-style Unigram (Metaspace, </s> after every
  completions prompt) with a Gemma-like template that folds a system message into the
  first user turn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from servescope.workloads.corpus_index import CORPUS_FILE

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLE_TAGS = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{% set system_message = 'You are a helpful assistant. Keep answers short.' %}"
    "{% set loop_messages = messages %}{% endif -%}"
    "{{ bos_token }}[SYS] {{ system_message }} [/SYS]\n"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}[USER] {{ message['content'] }}\n"
    "{% else %}[BOT] {{ message['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[BOT]{% endif %}"
)
SYSTEM_INTO_FIRST_TURN = (
    "{%- if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif -%}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (first_user_prefix if loop.first else '') + message['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
WORDS = ("request token server latency queue batch cache prefix model decode prefill kernel memory block "
         "the a of to and in is for with on that by this be are from or as at it an").split()


def _training_text(n_lines: int = 1500) -> list[str]:
    rng = random.Random(5)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))).capitalize() + "."

    return [" ".join(sentence() for _ in range(3)) for _ in range(n_lines)]


def _corpus_lines() -> list[str]:
    return CORPUS_FILE.read_text(encoding="utf-8").splitlines()


def _save(folder: Path, tok: Tokenizer, config: dict) -> Path:
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return folder


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
    return _save(folder, tok, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML})


@pytest.fixture(scope="session")
def bytelevel_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytelevel_tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line.lower() for line in _corpus_lines()], trainer)
    assert tok.get_vocab_size() == 2048
    return _save(folder, tok, {"eos_token": "<|endoftext|>", "chat_template": ROLE_TAGS})


@pytest.fixture(scope="session")
def wordpiece_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wordpiece_tokenizer")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=3000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                        show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return _save(folder, tok, {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
                               "chat_template": DEFAULT_SYSTEM})


@pytest.fixture(scope="session")
def unigram_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unigram_tokenizer")
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=2000, unk_token="<unk>", initial_alphabet=["\n"], show_progress=False,
                                      special_tokens=["<pad>", "</s>", "<unk>", "<start_of_turn>", "<end_of_turn>"])
    tok.train_from_iterator(_corpus_lines()[:1200], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return _save(folder, tok, {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                               "chat_template": SYSTEM_INTO_FIRST_TURN})


# Family -> the fixture that builds its folder (None: the bundled tokenizer).
FAMILIES = {"bundled": None, "chatml": "hf_tokenizer_dir", "bytelevel": "bytelevel_tokenizer_dir",
            "wordpiece": "wordpiece_tokenizer_dir", "unigram": "unigram_tokenizer_dir"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_tokenizer(request):
    """The PromptTokenizer of each family in turn (tests that take it run once per family)."""
    from servescope.workloads.tokenizer import load_tokenizer

    fixture = FAMILIES[request.param]
    return load_tokenizer(None if fixture is None else str(request.getfixturevalue(fixture)))
