"""Helpers shared by the data tests (imported as ``data_testlib``; a unique module name,
since test directories have no ``__init__.py``).

The test tokenizer's vocabulary: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then ``w0``..``w99``
as 3..102, so ``"w1 w2"`` encodes to ``[4, 5]`` and expected rows can be written by hand.
"""

import pathlib

from rlhf_jax.config import DataConfig

PAD, EOS, UNK = 0, 1, 2


def word_ids(text: str) -> list[int]:
    """The test tokenizer's encoding of ``"w3 w7"``-style text: ``[6, 10]``."""
    return [int(w[1:]) + 3 for w in text.split()]


def words(start: int, n: int) -> str:
    """``n`` consecutive words from ``w<start>``: ``words(5, 3) == "w5 w6 w7"``."""
    return " ".join(f"w{i}" for i in range(start, start + n))


def save_tokenizer(out_dir: pathlib.Path, with_pad: bool) -> pathlib.Path:
    """Writes the word-level test tokenizer (``save_pretrained`` layout) to ``out_dir``."""
    # Imported here: transformers pulls in torch, seconds the multiprocess worker should not pay.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{f"w{i}": i + 3 for i in range(100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"eos_token": "<eos>", "unk_token": "<unk>"}
    if with_pad:
        specials["pad_token"] = "<pad>"
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(str(out_dir))
    return out_dir


def data_cfg(**overrides) -> DataConfig:
    """A DataConfig for tests: batch 4, rows of 16, no shuffling unless asked."""
    base = dict(train_path="unused", val_path=None, batch_size=4, max_len=16, shuffle=False)
    return DataConfig(**{**base, **overrides})


# Chat tokenizers: word-level, so expected rows can be written by hand. Each holds its
# special tokens first, then "system" "user" "assistant", then w0..w99.
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # 0, 1, 2 (as SmolLM2's)
# SmolLM2-135M-Instruct's template: a default system message when the conversation has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>")  # 0..4
# Llama 3's template: BOS written by the template, turns closed by <|eot_id|>, not by EOS.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ROLE_WORDS = ("system", "user", "assistant")


def chat_word_id(specials: tuple[str, ...], word: str) -> int:
    """A chat tokenizer's id of ``word`` (a special, a role word, or ``w<i>``)."""
    if word in specials:
        return specials.index(word)
    if word in ROLE_WORDS:
        return len(specials) + ROLE_WORDS.index(word)
    return len(specials) + len(ROLE_WORDS) + 1 + int(word[1:])  # +1: <unk>


def save_chat_tokenizer(out_dir: pathlib.Path, style: str, words: tuple[str, ...] = ()) -> pathlib.Path:
    """A word-level tokenizer with a chat template: ``chatml`` (SmolLM2's: EOS = <|im_end|>, no
    BOS added) or ``llama3`` (EOS <|end_of_text|>, end of turn <|eot_id|>, and BOS added by
    ``add_special_tokens=True``, as Llama's does). Its words: ``w0``..``w99``, or ``words``
    (then :func:`chat_word_id` does not apply)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = CHATML_SPECIALS if style == "chatml" else LLAMA3_SPECIALS
    words = [*specials, *ROLE_WORDS, "<unk>", *(words or (f"w{i}" for i in range(100)))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if style == "chatml":
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     pad_token="<|im_end|>", unk_token="<unk>",
                                     additional_special_tokens=["<|endoftext|>"], chat_template=CHATML_TEMPLATE)
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                     eos_token="<|end_of_text|>", unk_token="<unk>",
                                     additional_special_tokens=list(LLAMA3_SPECIALS[2:]), chat_template=LLAMA3_TEMPLATE)
    hf.save_pretrained(str(out_dir))
    return out_dir


BPE_CORPUS = (
    "SUBREDDIT: r/relationships TITLE: My friend keeps cancelling plans POST: We were supposed to meet "
    "TL;DR: my friend cancels plans and I do not know why. Human: What is a dog? Assistant: A dog is an "
    "animal. I think a dog is a mammal and not a fish. The sky is blue and the grass is green. "
)


def save_bpe_tokenizer(out_dir: pathlib.Path, eos: str = "<|endoftext|>") -> pathlib.Path:
    """A byte-level BPE tokenizer (GPT-2's kind: a word carries the space before it, "Ġit"),
    trained here on :data:`BPE_CORPUS`, with ``eos`` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([BPE_CORPUS] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos).save_pretrained(str(out_dir))
    return out_dir
