"""``rlhf-jax convert``: Hugging Face checkpoint <-> our export format.

    rlhf-jax convert --from-hf HF_DIR --out EXPORT_DIR [--overwrite]
    rlhf-jax convert --to-hf EXPORT_DIR --out HF_DIR [--tokenizer TOKENIZER_DIR] [--overwrite]
    rlhf-jax convert --from-gguf MODEL.gguf --out HF_DIR

An export (``checkpoint.export_params``) is what a stage's ``init_from`` reads; a HF
directory is what ``transformers`` and other tools read (and ``model.hf_path`` /
``tokenizer.path``). ``--from-gguf`` turns a llama.cpp GGUF file into a HF directory with
its tokenizer (needs the ``gguf`` extra: ``pip install 'rlhf_jax[gguf]'``); quantised
weights are dequantised to float32, so the model is the quantised one, not its original.
Params pass through a mesh of this host's devices (``--mesh``, default all devices on
``fsdp``), so a model larger than one device converts.

Nothing of the user's is deleted: ``--out`` is a new or empty directory; an existing export
(``--from-hf``) or existing HF files (``--to-hf``) are replaced only with ``--overwrite``, and
``--to-hf`` touches no file but those it writes; ``--from-gguf`` writes only into a new or
empty directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys

from rlhf_jax import checkpoint, parameters, sharding
from rlhf_jax.config import ConfigError, MeshConfig


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``convert`` flags, on ``parser``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="a HF checkpoint directory to read")
    source.add_argument("--to-hf", metavar="SOURCE",
                        help="a language model to read: an export, or a stage's checkpoints directory")
    source.add_argument("--from-gguf", metavar="FILE",
                        help="a GGUF file to write as a HF directory with its tokenizer (the gguf extra)")
    parser.add_argument("--out", required=True,
                        help="the directory to write: new or empty (an existing export, or the files --to-hf "
                             "writes, only with --overwrite; nothing else in it is ever touched)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an export (--from-hf) or the HF files (--to-hf) already in --out")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="with --to-hf: copy this tokenizer's files into --out")
    parser.add_argument("--mesh", default="1,-1,1", metavar="DATA,FSDP,TENSOR",
                        help="mesh the params pass through (default: every device on fsdp)")
    return parser


def _mesh(spec: str):
    try:
        data, fsdp, tensor = (int(n) for n in spec.split(","))
    except ValueError as err:
        raise ConfigError(f"--mesh={spec!r}: expected three integers DATA,FSDP,TENSOR") from err
    return sharding.make_mesh(MeshConfig(data, fsdp, tensor))


def check_out(source: str | pathlib.Path, out: str | pathlib.Path) -> None:
    """``--out`` may be neither the source, nor inside it, nor a directory holding it."""
    src, dst = pathlib.Path(source).resolve(), pathlib.Path(out).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        relation = "is" if dst == src else "is inside" if src in dst.parents else "contains"
        raise ConfigError(f"--out {out} {relation} the source {source}; choose a directory apart from it")


def check_export_destination(out: str | pathlib.Path, overwrite: bool) -> None:
    """An export replaces its directory whole: ``out`` must be new or empty, or hold an
    export that ``overwrite`` allows replacing. A user's other files are never deleted."""
    out = pathlib.Path(out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / checkpoint.EXPORT_META).is_file():
            raise ConfigError(f"--out {out}: is not empty and holds no export; choose a new or empty "
                              "directory (nothing in it was touched)")
        if not overwrite:
            raise ConfigError(f"--out {out}: already holds an export; pass --overwrite to replace it")
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")


def from_hf(hf_dir: str | pathlib.Path, out: str | pathlib.Path, mesh, overwrite: bool = False) -> pathlib.Path:
    """HF checkpoint -> export. The export stands alone, so it does not point back at
    ``hf_dir`` (``hf_path`` is cleared)."""
    from rlhf_jax.models import LanguageModel
    from rlhf_jax.models.hf_config import model_config_from_hf

    check_out(hf_dir, out)
    check_export_destination(out, overwrite)
    cfg = model_config_from_hf(hf_dir)
    params, _ = parameters.load(str(hf_dir), LanguageModel(cfg), mesh, "--from-hf")
    return checkpoint.export_params(out, params, dataclasses.replace(cfg, hf_path=None))


def from_gguf(gguf_file: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """A GGUF file -> a HF checkpoint directory (``config.json``, ``model.safetensors`` in
    float32, the tokenizer with its chat template) that ``model.hf_path`` reads.

    ``transformers`` reads GGUF (dequantising every tensor) but refuses to save a model it
    loaded from one; the same architecture made from its config, without the quantisation
    entry, takes the state dict and saves. ``out`` must be new or empty: the directory is
    written beside it and renamed into place, and refused if our model cannot represent it."""
    from rlhf_jax.models.hf_config import model_config_from_hf

    gguf_file, out = pathlib.Path(gguf_file), pathlib.Path(out)
    if not gguf_file.is_file():
        raise ConfigError(f"--from-gguf {gguf_file}: no such file")
    check_out(gguf_file, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory; choose a new or empty one "
                          "(nothing in it was touched)")
    try:
        import accelerate  # noqa: F401  (transformers reads GGUF through gguf and accelerate)
        import gguf  # noqa: F401
        import torch
        import transformers
    except ImportError as err:
        raise ConfigError(f"--from-gguf needs the gguf extra ({err.name} is missing): "
                          "pip install 'rlhf_jax[gguf]'") from err
    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - transformers and gguf raise many types for a file they cannot read
        raise ConfigError(f"--from-gguf {gguf_file}: transformers cannot read it ({type(err).__name__}: "
                          f"{str(err)[:300]})") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    staging = out.with_name(f".{out.name}.from_gguf.tmp")  # ours: an interrupted conversion's leftover
    if staging.exists():
        shutil.rmtree(staging)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        model_config_from_hf(staging)  # refuses (naming the field) what our model cannot compute
    except ValueError:
        shutil.rmtree(staging)
        raise
    staging.rename(out)
    return out


def to_hf(export_dir: str | pathlib.Path, out: str | pathlib.Path, mesh,
          tokenizer_dir: str | None = None, overwrite: bool = False) -> pathlib.Path:
    """A language model's export (SFT or PPO policy) or stage checkpoints -> HF checkpoint.
    Files already in ``out`` are replaced only with ``overwrite``; no other file is touched."""
    from rlhf_jax.models import LanguageModel, hf

    src = parameters.source(str(export_dir), "--to-hf")
    if src.kind == "hf":
        raise ConfigError(f"--to-hf {export_dir}: already a HF checkpoint")
    check_out(export_dir, out)
    hf.check_hf_destination(out, hf.hf_files_written(tokenizer_dir), overwrite)  # before any loading
    if src.scalar:
        raise checkpoint.CheckpointError(f"{export_dir}: not a language-model export (a reward model's "
                                         "export has no LM head)")
    cfg = src.model
    try:
        params, _ = parameters.load(str(export_dir), LanguageModel(cfg), mesh, "--to-hf")
    except (ValueError, KeyError) as err:  # Orbax names the tree mismatch
        raise checkpoint.CheckpointError(f"{export_dir}: not a language-model export (a reward or value "
                                         f"model has no LM head): {err}") from err
    return hf.export_hf(params, cfg, out, tokenizer_dir, overwrite)


def convert_main(args: argparse.Namespace) -> int:
    """Runs a parsed ``convert`` command; returns the exit status."""
    try:
        if args.from_gguf:
            if args.tokenizer or args.overwrite:
                raise ConfigError("--tokenizer and --overwrite go with --to-hf / --from-hf (a GGUF file holds its "
                                  "own tokenizer; --from-gguf writes only into a new or empty directory)")
            written = from_gguf(args.from_gguf, args.out)
        elif args.from_hf:
            if args.tokenizer:
                raise ConfigError("--tokenizer goes with --to-hf (an export holds no tokenizer)")
            written = from_hf(args.from_hf, args.out, _mesh(args.mesh), args.overwrite)
        else:
            written = to_hf(args.to_hf, args.out, _mesh(args.mesh), args.tokenizer, args.overwrite)
    except ValueError as err:  # ConfigError, HFError, CheckpointError, ShardingError
        print(f"rlhf-jax convert: error: {err}", file=sys.stderr)
        return 2
    print(f"convert: wrote {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``rlhf-jax convert ...`` with ``argv`` the arguments after ``convert``."""
    parser = argparse.ArgumentParser(prog="rlhf-jax convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return convert_main(add_convert_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
