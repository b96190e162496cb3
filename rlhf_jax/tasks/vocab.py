"""The closed vocabulary of the embedded synthetic task.

Every string the task writes (prompts, responses, pretraining text) is a sequence of these
words separated by single spaces, so a word-level tokenizer covers it with no ``<unk>``.
The order below fixes the token ids; changing it changes every tokenizer written by
:func:`rlhf_jax.tasks.write_task_files`, so append rather than reorder.
"""

from __future__ import annotations

# Ids 0..3: <pad> must be 0 (padding masks and zero-initialised buffers assume it).
PAD, EOS, UNK, BOS = "<pad>", "<eos>", "<unk>", "<bos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK, BOS)

# The prompt ends with the separator; the response starts right after it.
SEPARATOR = "=>"
COLON = ":"
MARKERS: tuple[str, ...] = (COLON, SEPARATOR, ",", ".", "?", "!", "(", ")")

MAX_NUMBER = 20
NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(MAX_NUMBER + 1))
LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")

FRUITS = ("apple", "pear", "plum", "fig", "kiwi", "lime", "grape", "melon", "peach", "mango")
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "ant", "cow", "pig", "hen", "yak")
COLORS = ("red", "blue", "green", "pink", "gray", "gold", "black", "white")
NATURE = ("sun", "moon", "star", "rain", "snow", "tree", "rock", "lake")
ITEM_WORDS: tuple[str, ...] = FRUITS + ANIMALS + COLORS + NATURE

# Words the instruction heads are built from (see ``instructions.FAMILIES``).
INSTRUCTION_WORDS: tuple[str, ...] = (
    "please", "the", "list", "reverse", "write", "backwards", "order", "of", "sort",
    "ascending", "descending", "in", "increasing", "decreasing", "from", "low", "to", "high",
    "copy", "without", "remove", "omit", "drop", "every", "count", "how", "many", "repeat",
    "times", "say", "first", "last", "keep", "only",
)

# Words that only appear in pretraining prose; they give the base LM something to model
# beyond the instruction format.
FILLER_WORDS: tuple[str, ...] = (
    "is", "are", "and", "then", "here", "some", "one", "two", "yes", "no", "after",
    "before", "comes", "next", "big", "small", "like", "see", "they", "we", "answer",
)

# ---- Appended for the surface dimensions of a response (ids of the words above unchanged).
# A prompt that starts with this word asks for a respectful answer (the paper's
# RealToxicityPrompts "respectful" instruction).
RESPECTFUL_MARKER = "politely"
# The "internet"'s offensive words: inappropriate for a customer assistant anywhere, worse
# where the prompt asked for respect.
OFFENSIVE_WORDS: tuple[str, ...] = ("stupid", "dumb", "idiot", "ugh", "loser", "whatever")
# Explicit constraints: ", end with W" and ", in brackets" after a prompt's items.
CONSTRAINT_WORDS: tuple[str, ...] = ("end", "with", "brackets")
# The words an "end with" constraint names: never content, prose or offensive words, so
# meeting it changes no other dimension.
END_WORDS: tuple[str, ...] = ("!", "?", "done", "ok", "thanks")
OPEN_BRACKET, CLOSE_BRACKET = "(", ")"


def vocabulary() -> list[str]:
    """All word types in id order: special tokens first, then markers, numbers, letters,
    item words, instruction words, filler words, and (appended later) the respectful
    marker, offensive words, constraint words and end words. Raises if two groups share a
    word."""
    new_end_words = [w for w in END_WORDS if w not in MARKERS]
    words = [*SPECIAL_TOKENS, *MARKERS, *NUMBERS, *LETTERS, *ITEM_WORDS, *INSTRUCTION_WORDS,
             *FILLER_WORDS, RESPECTFUL_MARKER, *OFFENSIVE_WORDS, *CONSTRAINT_WORDS, *new_end_words]
    if len(set(words)) != len(words):
        dupes = sorted({w for w in words if words.count(w) > 1})
        raise AssertionError(f"vocabulary has duplicate words: {dupes}")
    return words


VOCAB: tuple[str, ...] = tuple(vocabulary())
VOCAB_SIZE: int = len(VOCAB)
# Words a response can be made of; corruption draws replacements from here, never from the
# special tokens, so a corrupted response is still valid task text.
CONTENT_WORDS: tuple[str, ...] = NUMBERS + LETTERS + ITEM_WORDS
