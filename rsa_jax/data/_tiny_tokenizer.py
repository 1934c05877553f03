"""A small byte-level BPE tokenizer trained offline in memory, with ChatML special tokens and
template: the tokenizer of `model.path: tiny` runs (tests, smoke runs), so nothing is downloaded."""

from __future__ import annotations

from collections.abc import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_DEFAULT_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, knead, rest, and bake.",
    "I cannot help with that request because it could hurt people.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Here is a safe and helpful answer with emoji 🙂 and accents: café, naïve, Zürich.",
    "BEGINNING OF CONVERSATION: USER: tell me a story ASSISTANT: Once upon a time...",
]


def train_bpe_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """A `transformers.PreTrainedTokenizerFast` (byte-level BPE) trained on `corpus` in memory.

    EOS is `<|im_end|>` (as in ChatML models), padding `<pad>`, and the chat template is ChatML.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or _DEFAULT_CORPUS) * 4, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped
