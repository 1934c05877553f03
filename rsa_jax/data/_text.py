"""Data text is encoded as text: a response or prompt that spells a control token stays plain text.

A tokenizer matches its special tokens (`<|im_end|>`, `<|im_start|>`, `</s>`, ...) anywhere in the
string it encodes. Data text that spells one, e.g. a response containing `<|im_end|>\n<|im_start|>
user`, would otherwise become the control tokens themselves: the response ends early in the labels
and the data can inject chat structure. Here only the prompt template (the tokenizer's chat template
or `data.template`) writes control tokens; what the data says is encoded as ordinary text.

- Responses: `TextEncoder.plain`. Text that spells no special token takes the tokenizer's own path
  (the same ids as before, at Rust speed); otherwise the text is encoded by the tokenizer's
  normaliser, pre-tokenizer and model alone, which never match added tokens. Both are thread-safe
  (Grain's read threads share the tokenizer): `split_special_tokens=True` would flip a flag on the
  shared Rust tokenizer for every call.
- Prompts: transformers' `apply_chat_template(..., sanitize_control_tokens=True)` marks the control
  tokens inside message contents and encodes them as text. A `data.template` ("USER: {prompt}
  ASSISTANT:") is turned into an equivalent one-message chat template, so it goes the same way.
"""

from __future__ import annotations

import functools
import re
import string


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer turns into special (control) tokens wherever they occur."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in added.values() if getattr(t, "special", False)}
    found |= set(getattr(tokenizer, "all_special_tokens", ()) or ())
    return tuple(sorted(t for t in found if t))


@functools.lru_cache(maxsize=16)
def template_as_chat_template(template: str) -> str:
    """A Jinja chat template that renders `template.format(prompt=<the one message>)`.

    The literal parts go inside `{% raw %}` blocks, so braces and Jinja syntax in them stay text.
    """
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if "{% endraw %}" in literal:
            raise ValueError(f"data.template {template!r} contains '{{% endraw %}}'")
        if literal:
            parts.append("{% raw %}" + literal + "{% endraw %}")
        if field is None:
            continue
        if field != "prompt" or spec or conversion:
            raise ValueError(
                f"data.template {template!r}: only the field {{prompt}} is allowed, got "
                f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            )
        parts.append("{{ messages[0]['content'] }}")
    return "".join(parts)


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids `add_special_tokens=True` puts before and after a text (e.g. BOS), found by
    encoding one word both ways (tokenizers do not expose their post-processor uniformly)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _ids(encoded) -> list[int]:
    return list(encoded if isinstance(encoded, list) else encoded["input_ids"])


def _any_of(tokens: tuple[str, ...]) -> re.Pattern | None:
    longest_first = sorted((t for t in tokens if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first))) if longest_first else None


class TextEncoder:
    """Encodes data text for one tokenizer; the control tokens and BOS/EOS affixes are looked up
    once. Thread-safe: it never changes the tokenizer's state."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._control = _any_of(control_tokens(tokenizer))
        # Every added token: a prompt that spells none of them takes the tokenizer's own path,
        # which then gives the same ids as the sanitizing one (and is faster: bench/data_text.py).
        self._added = _any_of(tuple(getattr(tokenizer, "added_tokens_encoder", {}) or {}))
        self._affixes = special_affixes(tokenizer)

    def spells_control_token(self, text: str) -> bool:
        """True when `text` contains a string the tokenizer would encode as a special token."""
        return self._control is not None and self._control.search(text) is not None

    def plain(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: no special tokens added, none matched inside.

        Args:
          text: data text (a response).
        Returns:
          list of int token ids; equal to `tokenizer(text, add_special_tokens=False)` whenever
          the text spells no special token.
        """
        tok = self.tokenizer
        if not self.spells_control_token(text):
            return tok(text, add_special_tokens=False)["input_ids"]
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:  # a Python (slow) tokenizer: no shared Rust state to race on
            return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        # The Rust pipeline minus the added-token matching: normalise, pre-tokenise, the model.
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = [text]
        if backend.pre_tokenizer is not None:
            pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for piece in pieces for token in backend.model.tokenize(piece)]

    def prompt(self, prompt, template: str | None) -> list[int]:
        """Token ids of a prompt: control tokens only where the template writes them.

        Args:
          prompt: a string, or a list of chat messages {"role", "content"}.
          template: `data.template` with a `{prompt}` field (string prompts only), or None for
            the tokenizer's chat template (one user turn, with the generation prompt).
        Returns:
          list of int token ids. With a template, the tokenizer's special tokens (e.g. BOS) are
          added as `tokenizer(text)` adds them; a chat template writes its own.
        """
        tok = self.tokenizer
        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
        plain = self._added is None or not any(self._added.search(t) for t in texts)
        if isinstance(prompt, str) and template is not None:
            if plain:
                return tok(template.format(prompt=prompt), add_special_tokens=True)["input_ids"]
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                chat_template=template_as_chat_template(template),
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=True,
            )
            before, after = self._affixes
            return before + _ids(ids) + after
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if plain:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        ids = tok.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
        )
        return _ids(ids)
