"""JSONL files stored as TFDS datasets in array_record, for random access without TensorFlow.

A validated JSONL file is written once by a ``tfds.core.GeneratorBasedBuilder`` with
``file_format='array_record'`` into ``<cache_dir>/<kind>/<content hash>/<version>/``; a
second call with the same file content finds it there and skips the build. It is read back
with ``tfds.builder_from_directory(...).as_data_source()``, which needs only
``array_record`` (``as_dataset`` would need TensorFlow). Records keep file order
(``disable_shuffling``) and their source line number, so later errors can name
``file:line``. A conversation prompt (a message list) is kept as its JSON text in
``prompt_messages`` (empty for a text prompt) and read back as the list.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.jsonl import KINDS, DataError, Kind, iter_records

_TEXT = tfds.features.Text
_PROMPT = lambda: {"prompt": _TEXT(), "prompt_messages": _TEXT()}  # noqa: E731
_FIELDS = {
    "demonstrations": lambda: {**_PROMPT(), "response": _TEXT()},
    "text": lambda: {"text": _TEXT()},
    "prompts": lambda: _PROMPT(),
    "comparisons": lambda: {**_PROMPT(),
                            "responses": tfds.features.Sequence(_TEXT()),
                            "ranks": tfds.features.Sequence(np.int32)},
}


def _to_features(record: dict[str, Any]) -> dict[str, Any]:
    """A validated record as stored: a conversation prompt goes to ``prompt_messages``."""
    if "prompt" not in record:
        return record
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return {**record, "prompt_messages": ""}
    return {**record, "prompt": "", "prompt_messages": json.dumps(prompt)}


def _from_features(record: dict[str, Any]) -> dict[str, Any]:
    messages = record.pop("prompt_messages", "")
    if messages:
        record["prompt"] = json.loads(messages)
    return record


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One split, ``train``, holding every record of one JSONL file plus its ``line``.

    Not registered with TFDS: instances are made here, with the JSONL path, and the
    stored datasets are read back from their directory.
    """

    VERSION = tfds.core.Version("1.1.0")  # bump when validation or features change (1.1: prompt_messages)
    KIND: str = ""

    def __init__(self, *, jsonl_path: pathlib.Path, **kwargs):
        self._jsonl_path = jsonl_path
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks beside a builder's code for checksums and metadata; ours has none, and
        # that look-up imports `importlib_resources`, which tensorflow-datasets 4.9 declares
        # only for Python < 3.9 (ModuleNotFoundError here otherwise).
        return None

    # TFDS prints "Downloading and preparing ..." to stdout for every build; nothing is
    # downloaded here and the stage's own progress bar says what is happening.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({**_FIELDS[self.KIND](), "line": np.int64})
        return tfds.core.DatasetInfo(
            builder=self, features=features, disable_shuffling=True,
            description=f"rlhf_jax {self.KIND} records from {self._jsonl_path}")

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the source is a local file
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        count = 0
        for line, record in iter_records(self._jsonl_path, self.KIND):
            count += 1
            yield line, {**_to_features(record), "line": line}
        if not count:
            raise DataError(f"{self._jsonl_path}: no records (the file is empty)")


def _builder(kind: str) -> type[_JsonlBuilder]:
    """The builder of one record kind, whose TFDS name (the cache directory's) is the kind."""
    return type(f"_{kind.title()}Builder", (_JsonlBuilder,), {"name": kind, "KIND": kind},
                skip_registration=True)


_BUILDERS = {kind: _builder(kind) for kind in _FIELDS}


def content_hash(path: pathlib.Path) -> str:
    """First 16 hex digits of the file's SHA-256: the cache key of its stored dataset."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def build_store(path: str | pathlib.Path, kind: Kind,
                cache_dir: str | pathlib.Path) -> pathlib.Path:
    """Validates ``path`` and stores it as array_record, once. Returns the dataset directory.

    Safe when several processes share ``cache_dir``: each writes into its own incomplete
    directory, the first rename wins, and a loser whose rename fails uses the winner's.
    """
    if kind not in _BUILDERS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file ({kind} JSONL expected)")
    builder_cls, key = _BUILDERS[kind], content_hash(path)
    data_dir = pathlib.Path(cache_dir) / builder_cls.name / key / str(builder_cls.VERSION)
    # TFDS renames a finished build into place, so an existing directory is complete.
    if (data_dir / "dataset_info.json").is_file():
        return data_dir
    builder = builder_cls(jsonl_path=path, data_dir=str(cache_dir), file_format="array_record",
                          config=tfds.core.BuilderConfig(name=key))
    assert pathlib.Path(builder.data_dir) == data_dir, (builder.data_dir, data_dir)
    try:
        # Nothing is downloaded: _split_generators reads the local JSONL file.
        builder.download_and_prepare()
    except OSError:
        if not (data_dir / "dataset_info.json").is_file():
            raise
    return data_dir


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_decode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class RecordSource:
    """Random access to a stored file's records as plain Python (str, int, lists; a
    conversation prompt as its message list).

    ``source[i]`` is the i-th record of the file (file order) with its ``line``; ``path``
    is the JSONL file, for error messages. Usable as a grain data source.
    """

    def __init__(self, dataset_dir: str | pathlib.Path, path: str | pathlib.Path):
        self.path = str(path)
        self.dataset_dir = pathlib.Path(dataset_dir)
        self._source = tfds.builder_from_directory(str(dataset_dir)).as_data_source()["train"]

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _from_features({k: _decode(v) for k, v in self._source[int(index)].items()})

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        # One read per record: array_record's batched read starts a thread pool per call,
        # ~600 us for a single local record against ~45 us for a plain read.
        return [self[i] for i in indices]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def open_store(path: str | pathlib.Path, kind: Kind, cache_dir: str | pathlib.Path) -> RecordSource:
    """Builds the store for ``path`` if needed and opens it for random access."""
    return RecordSource(build_store(path, kind, cache_dir), path)
