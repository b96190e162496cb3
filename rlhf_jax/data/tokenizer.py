"""Tokenizers as the data pipeline sees them: ``encode``, ``encode_prompt``, ``eos_id``,
``text_eos_id``, ``pad_id``.

Loaders accept anything with that shape (:class:`TextTokenizer`): the embedded task's
tokenizer, or a Hugging Face tokenizer from a local directory wrapped in
:class:`HFTokenizer`. Nothing is ever downloaded.

Chat templates. A conversation prompt (a message list, :mod:`rlhf_jax.data.chat`) is
rendered with the tokenizer's own template,
``apply_chat_template(messages, add_generation_prompt=True)``, and the rendered text is
encoded *without* special tokens: the template already writes any BOS, so a tokenizer that
adds one (Llama's) would otherwise start the row with two. The response then ends with the
template's end-of-turn token, which is also where the sampler stops: ``<|im_end|>`` for
ChatML (SmolLM2, Qwen; also their EOS), ``<|eot_id|>`` for Llama 3 (whose EOS may be
``<|end_of_text|>``). With ``chat_template="none"``, or a tokenizer without a template, a
conversation prompt is refused and everything is as for text.
"""

from __future__ import annotations

import pathlib
from typing import Literal, Protocol, Sequence

import numpy as np

from rlhf_jax.data.chat import Prompt
from rlhf_jax.data.jsonl import DataError

ChatTemplate = Literal["auto", "none"]
CHAT_TEMPLATES: tuple[str, ...] = ("auto", "none")
_PROBE = "rlhfjaxprobe"  # an assistant reply that no template writes itself


class TextTokenizer(Protocol):
    """What the loaders need. ``encode`` adds no special tokens (loaders add EOS).

    ``eos_id`` ends every response and is the sampler's stop token; ``text_eos_id`` ends a
    pretraining text. They differ only under a chat template whose end-of-turn is not the
    tokenizer's EOS. ``encode_prompt`` is needed only for conversation prompts.
    """

    eos_id: int
    text_eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, prompt: Prompt) -> list[int]: ...


def encode_ids(tokenizer: TextTokenizer, text: str) -> np.ndarray:
    """``text``'s token ids as an int32 array (the loaders keep them: 4 bytes a token)."""
    return np.asarray(tokenizer.encode(text), np.int32)


def prompt_ids(tokenizer: TextTokenizer, prompt: Prompt) -> np.ndarray:
    """A record's prompt as int32 ids: text as :func:`encode_ids`, a conversation rendered
    by the tokenizer's chat template (raises :class:`DataError` when it has none)."""
    if isinstance(prompt, str):
        return encode_ids(tokenizer, prompt)
    return np.asarray(tokenizer.encode_prompt(prompt), np.int32)


def end_of_turn_id(hf_tokenizer, source: str) -> int:
    """The special token the chat template writes right after an assistant reply.

    Found by rendering a probe conversation: the first token after the reply's text. It must
    be a special token, as a sampler stops on one id that ordinary text never produces.
    """
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    rendered = hf_tokenizer.apply_chat_template(conversation, tokenize=False)
    at = rendered.rfind(_PROBE)
    after = hf_tokenizer.encode(rendered[at + len(_PROBE):], add_special_tokens=False) if at >= 0 else []
    if not after or after[0] not in hf_tokenizer.all_special_ids:
        found = repr(rendered[at + len(_PROBE):][:20]) if at >= 0 else "no reply text"
        raise DataError(f"{source}: its chat template ends an assistant reply with {found}, not a "
                        "special token to stop on; set tokenizer.chat_template='none'")
    return int(after[0])


class HFTokenizer:
    """A ``transformers`` tokenizer seen through :class:`TextTokenizer`.

    ``chat_template``: ``"auto"`` renders conversation prompts with the tokenizer's own
    template when it has one (``uses_chat_template``); ``eos_id`` is then the template's
    end-of-turn token, for every response, text prompts' included, so one stop token holds
    for the whole run. ``"none"``: no template, ``eos_id`` is the EOS. A text prompt is always
    encoded as it stands. ``pad_id`` falls back to the EOS when the tokenizer has no pad
    token (GPT-2 and Llama have none); padding is always masked out, so reusing it is harmless.
    """

    def __init__(self, hf_tokenizer, source: str = "<tokenizer>", chat_template: ChatTemplate = "auto"):
        if hf_tokenizer.eos_token_id is None:
            raise DataError(f"{source}: the tokenizer has no EOS token; "
                            "responses must end with one")
        if chat_template not in CHAT_TEMPLATES:
            raise DataError(f"chat_template={chat_template!r}: expected one of {CHAT_TEMPLATES}")
        self.hf = hf_tokenizer
        self.source = source
        self.text_eos_id: int = int(hf_tokenizer.eos_token_id)
        self.uses_chat_template = chat_template == "auto" and bool(hf_tokenizer.chat_template)
        self.eos_id: int = end_of_turn_id(hf_tokenizer, source) if self.uses_chat_template else self.text_eos_id
        pad = hf_tokenizer.pad_token_id
        self.pad_id: int = self.text_eos_id if pad is None else int(pad)
        self.vocab_size: int = len(hf_tokenizer)  # includes added tokens, unlike .vocab_size
        self._rendered: dict[tuple[int, ...], list] = {}  # prompt ids -> the conversation they render

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def render_prompt(self, messages: list) -> str:
        """A conversation as its chat-template text, ending where the assistant's reply starts."""
        if not self.uses_chat_template:
            why = "has no chat template" if not self.hf.chat_template else "is used with tokenizer.chat_template='none'"
            raise DataError(f"a conversation prompt (a message list) needs a chat template, and the tokenizer "
                            f"{self.source} {why}")
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja raises its own types, e.g. for roles that must alternate
            raise DataError(f"the chat template of {self.source} refused the conversation "
                            f"({type(err).__name__}: {err})") from err

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A prompt's ids: text encoded as it stands; a conversation rendered, then encoded
        without special tokens (the rendered text holds BOS where the template wants one)."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        ids = self.encode(self.render_prompt(prompt))
        self._rendered[tuple(ids)] = prompt
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def decode_prompt(self, ids: Sequence[int]) -> Prompt:
        """The prompt a sampled row started from: the conversation when ``ids`` are one this
        tokenizer rendered (a template's text cannot be decoded back into messages), else
        the decoded text (what the policy saw, truncation included)."""
        return self._rendered.get(tuple(int(i) for i in ids)) or self.decode(ids)


def load_tokenizer(path: str | pathlib.Path, chat_template: ChatTemplate = "auto") -> HFTokenizer:
    """Loads a HF tokenizer from a local directory; never touches the network or runs its code."""
    from transformers import AutoTokenizer  # slow import, only needed for HF tokenizers

    path = pathlib.Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer path {path}: no such directory")
    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                           trust_remote_code=False)
    except Exception as err:  # transformers and tokenizers raise many types for a bad directory
        raise DataError(f"tokenizer path {path}: not a usable Hugging Face tokenizer "
                        f"directory ({type(err).__name__}: {err})") from err
    return HFTokenizer(hf, source=str(path), chat_template=chat_template)
