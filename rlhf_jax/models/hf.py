"""Hugging Face checkpoints <-> our params, for GPT-2 and the Llama family (Llama, Mistral, Qwen2).

Weights are read from safetensors with ``safe_open(framework="numpy")`` (never torch, never
pickle). Each parameter is built with ``jax.make_array_from_callback``, and the callback
reads only the slice of the HF tensor that one shard needs, so every device materialises
its own shard and a model larger than one device loads.

One table (:func:`param_sources`) says where each of our parameters lives in a HF
checkpoint; loading reads through it and exporting writes through it, so load -> export
-> load is the identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax import sharding
from rlhf_jax.atomic import replace_file, write_text
from rlhf_jax.config import ModelConfig
from rlhf_jax.models import vocab
from rlhf_jax.models.hf_config import HFError, hf_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-parameter buffers some checkpoints carry: GPT-2's causal mask and Llama's RoPE table.
IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------------------------------
# where each parameter lives


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one of our parameters lives in a HF checkpoint.

    Take tensor ``name`` (for a fused tensor, the ``part``-th of ``parts`` equal blocks
    along ``part_axis``), cut every axis whose ``split`` entry is a head size ``D`` into
    ``(n, D)``, and transpose by ``perm``: that is our array. E.g. a torch ``q_proj.weight``
    ``[H*D, E]`` is ``split=(D, None)`` -> ``[H, D, E]``, ``perm=(2, 0, 1)`` -> ``[E, H, D]``.
    """

    name: str
    split: tuple[int | None, ...]
    perm: tuple[int, ...]
    part: int = 0
    parts: int = 1
    part_axis: int = 0

    def block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of our block in HF coordinates, for our array of ``shape``."""
        cut = [shape[self.perm.index(j)] for j in range(len(self.perm))]
        out, j = [], 0
        for head_dim in self.split:
            width = 1 if head_dim is None else 2
            out.append(int(np.prod(cut[j:j + width])))
            j += width
        return tuple(out)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        block = list(self.block_shape(shape))
        block[self.part_axis] *= self.parts
        return tuple(block)

    def read(self, tensor, shape: tuple[int, ...], bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
        """Our array's ``[start, stop)`` per axis ``bounds``, reading only the HF rows and
        columns it needs from ``tensor`` (a safetensors slice)."""
        cut_bounds = [bounds[self.perm.index(j)] for j in range(len(self.perm))]
        hf_index, cut_shape, after, j = [], [], [], 0
        for head_dim in self.split:
            if head_dim is None:
                start, stop = cut_bounds[j]
                hf_index.append(slice(start, stop))
                cut_shape.append(stop - start)
                after.append(slice(None))
                j += 1
            else:  # whole heads are read; the head-dim range is cut after the reshape
                (h0, h1), (d0, d1) = cut_bounds[j], cut_bounds[j + 1]
                hf_index.append(slice(h0 * head_dim, h1 * head_dim))
                cut_shape += [h1 - h0, head_dim]
                after += [slice(None), slice(d0, d1)]
                j += 2
        offset = self.part * self.block_shape(shape)[self.part_axis]
        axis = hf_index[self.part_axis]
        hf_index[self.part_axis] = slice(axis.start + offset, axis.stop + offset)
        block = np.asarray(tensor[tuple(hf_index)]).reshape(cut_shape)
        return block[tuple(after)].transpose(self.perm)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`read` on the whole array: our array -> its HF block."""
        return array.transpose(np.argsort(self.perm)).reshape(self.block_shape(array.shape))


def _same(name: str, ndim: int = 1) -> Source:
    return Source(name, (None,) * ndim, tuple(range(ndim)))


def _linear(name: str) -> Source:
    """torch Linear ``[out, in]`` -> kernel ``[in, out]``."""
    return Source(name, (None, None), (1, 0))


def _gpt2_sources(cfg: ModelConfig, prefix: str) -> dict[str, Source]:
    """GPT-2's Conv1D weights are already ``[in, out]``; ``c_attn`` fuses q, k, v along out."""
    d = cfg.dim_per_head
    table = {"backbone/embed/embedding": _same(f"{prefix}wte.weight", 2),
             "backbone/position_embed/embedding": _same(f"{prefix}wpe.weight", 2),
             "backbone/final_norm/scale": _same(f"{prefix}ln_f.weight"),
             "backbone/final_norm/bias": _same(f"{prefix}ln_f.bias")}
    for i in range(cfg.n_layers):
        ours, hf = f"backbone/layers_{i}", f"{prefix}h.{i}"
        for norm, ln in (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")):
            table[f"{ours}/{norm}/scale"] = _same(f"{hf}.{ln}.weight")
            table[f"{ours}/{norm}/bias"] = _same(f"{hf}.{ln}.bias")
        for part, proj in enumerate(("query", "key", "value")):
            table[f"{ours}/attn/{proj}/kernel"] = Source(f"{hf}.attn.c_attn.weight", (None, d), (0, 1, 2),
                                                         part, 3, 1)
            table[f"{ours}/attn/{proj}/bias"] = Source(f"{hf}.attn.c_attn.bias", (d,), (0, 1), part, 3, 0)
        table[f"{ours}/attn/out/kernel"] = Source(f"{hf}.attn.c_proj.weight", (d, None), (0, 1, 2))
        table[f"{ours}/attn/out/bias"] = _same(f"{hf}.attn.c_proj.bias")
        for layer, conv in (("fc_in", "c_fc"), ("fc_out", "c_proj")):
            table[f"{ours}/mlp/{layer}/kernel"] = _same(f"{hf}.mlp.{conv}.weight", 2)
            table[f"{ours}/mlp/{layer}/bias"] = _same(f"{hf}.mlp.{conv}.bias")
    return table


def _llama_sources(cfg: ModelConfig) -> dict[str, Source]:
    d = cfg.dim_per_head
    table = {"backbone/embed/embedding": _same("model.embed_tokens.weight", 2),
             "backbone/final_norm/scale": _same("model.norm.weight")}
    for i in range(cfg.n_layers):
        ours, hf = f"backbone/layers_{i}", f"model.layers.{i}"
        table[f"{ours}/norm_attn/scale"] = _same(f"{hf}.input_layernorm.weight")
        table[f"{ours}/norm_mlp/scale"] = _same(f"{hf}.post_attention_layernorm.weight")
        for proj in ("query", "key", "value"):
            name = f"{hf}.self_attn.{proj[0]}_proj"
            table[f"{ours}/attn/{proj}/kernel"] = Source(f"{name}.weight", (d, None), (2, 0, 1))
            if cfg.qkv_bias:
                table[f"{ours}/attn/{proj}/bias"] = Source(f"{name}.bias", (d,), (0, 1))
        table[f"{ours}/attn/out/kernel"] = Source(f"{hf}.self_attn.o_proj.weight", (None, d), (1, 2, 0))
        for layer, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("fc_out", "down_proj")):
            table[f"{ours}/mlp/{layer}/kernel"] = _linear(f"{hf}.mlp.{proj}.weight")
    return table


def param_sources(cfg: ModelConfig, gpt2_prefix: str = "transformer.") -> dict[str, Source]:
    """Our parameter path (``backbone/layers_0/attn/query/kernel``) -> its :class:`Source`,
    for a :class:`LanguageModel` of ``cfg``. ``gpt2_prefix``: ``transformer.`` as
    ``save_pretrained`` writes; the original OpenAI checkpoints have none."""
    table = _gpt2_sources(cfg, gpt2_prefix) if cfg.family == "gpt2" else _llama_sources(cfg)
    if not cfg.tie_embeddings:
        table["lm_head/kernel"] = _linear("lm_head.weight")
    return table


# ---------------------------------------------------------------------------------------
# loading


class _Checkpoint:
    """The safetensors file(s) of a HF directory: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists. Use as a context manager (files stay open)."""

    def __init__(self, directory: pathlib.Path):
        single, index = directory / SINGLE_FILE, directory / INDEX_FILE
        if single.is_file():
            with safe_open(single, framework="numpy") as f:
                self.files = {name: single for name in f.keys()}
            self.listing = single
        elif index.is_file():
            self.files = _shards(index)
            self.listing = index
        else:
            raise HFError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
                          "are read; pytorch_model.bin is pickle and is never loaded)")
        self._stack = contextlib.ExitStack()
        self._opened: dict[pathlib.Path, Any] = {}

    def __enter__(self) -> "_Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def check_all_used(self, table: dict[str, Source], cfg: ModelConfig) -> None:
        """A tensor we would not read means the checkpoint is not the model ``cfg`` describes."""
        used = {src.name for src in table.values()}
        unused = [n for n in self.files if n not in used and not IGNORED.search(n)
                  and not (cfg.tie_embeddings and n == "lm_head.weight")]
        if unused:
            raise HFError(f"{self.listing}: tensors {sorted(unused)[:5]} ({len(unused)} in all) have "
                          f"no place in a {cfg.family} model with {cfg.n_layers} layers "
                          "(does config.json match?)")

    def slice(self, src: Source, path: str, shape: tuple[int, ...]):
        """The lazily read tensor behind our parameter ``path`` of ``shape``, shape-checked."""
        if src.name not in self.files:
            raise HFError(f"{self.listing}: tensor {src.name} (for our {path}) is missing")
        file = self.files[src.name]
        if file not in self._opened:
            self._opened[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        tensor = self._opened[file].get_slice(src.name)
        if tuple(tensor.get_shape()) != src.hf_shape(shape):
            raise HFError(f"{file}: tensor {src.name} has shape {tuple(tensor.get_shape())}, expected "
                          f"{src.hf_shape(shape)} for our {path} {shape} (does config.json match?)")
        return tensor


def _shards(index: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> shard file, from ``model.safetensors.index.json``; every shard it names
    must be there (a missing one is named, not found mid-load)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: index.parent / file for name, file in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HFError(f"{index}: not a safetensors index (a JSON object with a weight_map): "
                      f"{type(err).__name__}: {err}") from None
    missing = sorted({path.name for path in files.values() if not path.is_file()})
    if missing:
        raise HFError(f"{index}: names the shard {missing[0]}, which is missing ({len(missing)} of "
                      f"{len(set(files.values()))} shards missing)")
    return files


def _path_str(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def load_hf_params(directory: str | pathlib.Path, cfg: ModelConfig, target: Any) -> Any:
    """Reads a HF causal-LM checkpoint into our params, each leaf shaped, typed and sharded
    like ``target``'s (ShapeDtypeStructs with NamedShardings, e.g. from
    ``parameters.abstract(LanguageModel(cfg), mesh)``).

    ``target`` may be any sub-tree of a :class:`LanguageModel`'s params, e.g.
    ``{"backbone": abstract["backbone"]}`` to start a reward or value model. Every leaf is
    checked (tensor present, shape, divisible by its mesh axes) before anything is read.
    A target with a padded vocabulary (``model.vocab_pad_multiple``) gets the checkpoint's
    ``cfg.vocab_size`` rows and zeros past them.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    for key_path, leaf in leaves:
        if not isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
            raise HFError(f"target {_path_str(key_path)}: needs a NamedSharding (use "
                          "rlhf_jax.parameters.abstract(model, mesh))")
    sharding.check_divisible(target, jax.tree.map(lambda leaf: leaf.sharding, target))
    with _Checkpoint(pathlib.Path(directory)) as ckpt:
        table = param_sources(cfg, "transformer." if "transformer.wte.weight" in ckpt.files else "")
        ckpt.check_all_used(table, cfg)
        plan = []
        for key_path, leaf in leaves:
            path = _path_str(key_path)
            layers = _per_layer_paths(path, cfg)
            if layers is not None:  # scan_layers: one [L, ...] leaf from L per-layer tensors
                if any(p not in table for p in layers) or not leaf.shape or leaf.shape[0] != cfg.n_layers:
                    raise HFError(f"{path}: not a stacked parameter of a {cfg.family} causal LM with "
                                  f"{cfg.n_layers} layers (model.scan_layers=True), shape {tuple(leaf.shape)}")
                sources = [(table[p], ckpt.slice(table[p], p, tuple(leaf.shape[1:]))) for p in layers]
                plan.append((_Stacked(sources), None, leaf))
                continue
            if path not in table:
                raise HFError(f"{path}: not a parameter of a {cfg.family} causal LM; a HF checkpoint "
                              "gives only the language model's params (e.g. params['backbone'])")
            src, axis = table[path], vocab.vocab_axis(key_path)
            real_shape = tuple(leaf.shape)
            if axis is not None and leaf.shape[axis] > cfg.vocab_size:  # model.vocab_pad_multiple
                real_shape = tuple(cfg.vocab_size if i == axis else n for i, n in enumerate(leaf.shape))
                src = _PaddedVocab(src, real_shape, axis)
            plan.append((src, ckpt.slice(table[path], path, real_shape), leaf))
        arrays = [_make_array(src, tensor, leaf) for src, tensor, leaf in plan]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _per_layer_paths(path: str, cfg: ModelConfig) -> list[str] | None:
    """For a scanned model's ``backbone/layers/<rest>``: the unrolled paths
    ``backbone/layers_<i>/<rest>`` the table knows; None for any other path."""
    parts = path.split("/")
    if not cfg.stacked or "layers" not in parts:
        return None
    at = parts.index("layers")
    return ["/".join(parts[:at] + [f"layers_{i}"] + parts[at + 1:]) for i in range(cfg.n_layers)]


class _Stacked:
    """A stacked ``[L, ...]`` parameter read layer by layer from L :class:`Source` s."""

    def __init__(self, sources: list[tuple[Source, Any]]):
        self.sources = sources

    def read(self, _tensor, shape: tuple[int, ...], bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
        (start, stop), rest = bounds[0], bounds[1:]
        return np.stack([src.read(tensor, shape[1:], rest) for src, tensor in self.sources[start:stop]])


class _PaddedVocab:
    """A vocabulary parameter padded past the checkpoint's ``real_shape`` on ``axis``: each
    shard reads the real rows it covers and is zero past them (the padded ids' rows)."""

    def __init__(self, src: Source, real_shape: tuple[int, ...], axis: int):
        self.src, self.real_shape, self.axis = src, real_shape, axis

    def read(self, tensor, shape: tuple[int, ...], bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
        start, stop = bounds[self.axis]
        real = min(stop, self.real_shape[self.axis])
        out_shape = [b - a for a, b in bounds]
        if start >= real:  # a shard of padded rows only
            return np.zeros(out_shape, np.float32)
        inside = tuple((start, real) if i == self.axis else b for i, b in enumerate(bounds))
        block = self.src.read(tensor, self.real_shape, inside)
        widths = [(0, 0)] * len(bounds)
        widths[self.axis] = (0, stop - real)
        return np.pad(block, widths)


def _make_array(src: Source, tensor, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    """One parameter, each device given only its shard; replicas read the file once."""
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    shards: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if bounds not in shards:
            shards[bounds] = src.read(tensor, shape, bounds).astype(dtype)
        return shards[bounds]

    return jax.make_array_from_callback(shape, leaf.sharding, shard)


# ---------------------------------------------------------------------------------------
# export


def _to_host(x: Any) -> np.ndarray:
    """A whole array on this host; gathers across processes when shards live elsewhere."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our :class:`LanguageModel` params -> HF tensors by name (host numpy arrays). A padded
    vocabulary (``model.vocab_pad_multiple``) is cut to ``cfg.vocab_size`` rows, as HF has."""
    table = param_sources(cfg)
    params = vocab.unpad_vocab(params, cfg)
    flat = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if cfg.stacked:  # stacked [L, ...] leaves -> HF's per-layer tensors
        for path in [p for p in flat if _per_layer_paths(p, cfg) is not None]:
            stacked = _to_host(flat.pop(path))
            if stacked.ndim == 0 or stacked.shape[0] != cfg.n_layers:
                raise HFError(f"{path}: shape {stacked.shape} is not stacked over model.n_layers="
                              f"{cfg.n_layers} (model.scan_layers=True)")
            for i, layer_path in enumerate(_per_layer_paths(path, cfg)):
                flat[layer_path] = stacked[i]
    if set(flat) != set(table):
        missing, unexpected = sorted(set(table) - set(flat)), sorted(set(flat) - set(table))
        raise HFError(f"params do not match a {cfg.family} causal LM: missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}")
    blocks: dict[str, list[np.ndarray]] = {}
    for path, src in sorted(table.items(), key=lambda item: item[1].part):  # fused parts in order
        blocks.setdefault(src.name, []).append(src.to_hf(_to_host(flat[path])))
    axes = {src.name: src.part_axis for src in table.values()}
    return {name: np.ascontiguousarray(np.concatenate(parts, axis=axes[name]))
            for name, parts in blocks.items()}


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "*.gguf")


def hf_files_written(tokenizer_dir: str | pathlib.Path | None = None) -> list[str]:
    """The names :func:`export_hf` writes: the config, the weights and ``tokenizer_dir``'s
    tokenizer files (an error if it has none)."""
    names = ["config.json", SINGLE_FILE]
    if tokenizer_dir is not None:
        found = [n for n in TOKENIZER_FILES if (pathlib.Path(tokenizer_dir) / n).is_file()]
        if not found:
            raise HFError(f"{tokenizer_dir}: no tokenizer files (looked for {list(TOKENIZER_FILES)})")
        names += found
    return names


def check_hf_destination(directory: str | pathlib.Path, names: list[str], overwrite: bool = False) -> None:
    """Refuses to write ``names`` into ``directory`` when that would replace a file without
    ``overwrite``, or leave other weights beside ours (``transformers`` could load those)."""
    directory = pathlib.Path(directory)
    if directory.is_file():
        raise HFError(f"{directory}: is a file, not a directory")
    if not directory.is_dir():
        return
    present = [n for n in names if (directory / n).exists()]
    if present and not overwrite:
        raise HFError(f"{directory}: already holds {present}; pass --overwrite to replace those files "
                      "(nothing else in it is touched), or choose a new directory")
    others = sorted({p.name for pattern in WEIGHT_FILES for p in directory.glob(pattern)} - set(names))
    if others:
        raise HFError(f"{directory}: holds other weights ({', '.join(others[:3])}) that a loader could take "
                      "for this model's; choose a new or empty directory")


def export_hf(params: Any, cfg: ModelConfig, directory: str | pathlib.Path,
              tokenizer_dir: str | pathlib.Path | None = None, overwrite: bool = False) -> pathlib.Path:
    """Writes ``config.json`` and ``model.safetensors`` that ``transformers`` loads with
    ``AutoModelForCausalLM.from_pretrained(directory)``, plus the tokenizer files of
    ``tokenizer_dir`` if given. Every process gathers; process 0 writes. A file already there
    is replaced only with ``overwrite``, and nothing else in ``directory`` is touched."""
    directory = pathlib.Path(directory)
    names = hf_files_written(tokenizer_dir)
    check_hf_destination(directory, names, overwrite)
    config, tensors = hf_config(cfg), hf_tensors(params, cfg)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / "config.json", json.dumps(config, indent=2, sort_keys=True))
        # transformers refuses safetensors files whose metadata does not name a framework
        replace_file(directory / SINGLE_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        for name in names[2:]:
            replace_file(directory / name, lambda tmp, name=name: shutil.copyfile(
                pathlib.Path(tokenizer_dir) / name, tmp))
    return directory
