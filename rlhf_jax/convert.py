"""``rlhf-jax convert``: Hugging Face checkpoint <-> our export format.

    rlhf-jax convert --from-hf HF_DIR --out EXPORT_DIR
    rlhf-jax convert --to-hf EXPORT_DIR --out HF_DIR [--tokenizer TOKENIZER_DIR]
    rlhf-jax convert --from-gguf MODEL.gguf --out HF_DIR

An export (``checkpoint.export_params``) is what a stage's ``init_from`` reads; a HF
directory is what ``transformers`` and other tools read (and ``model.hf_path`` /
``tokenizer.path``). ``--from-gguf`` turns a llama.cpp GGUF file into a HF directory with
its tokenizer (needs the ``gguf`` extra: ``pip install 'rlhf_jax[gguf]'``); quantised
weights are dequantised to float32, so the model is the quantised one, not its original. Params pass through a mesh of
this host's devices (``--mesh``, default all devices on ``fsdp``), so a model larger than
one device converts.
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
    parser.add_argument("--out", required=True, help="the directory to write")
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


def from_hf(hf_dir: str | pathlib.Path, out: str | pathlib.Path, mesh) -> pathlib.Path:
    """HF checkpoint -> export. The export stands alone, so it does not point back at
    ``hf_dir`` (``hf_path`` is cleared)."""
    from rlhf_jax.models import LanguageModel
    from rlhf_jax.models.hf_config import model_config_from_hf

    cfg = model_config_from_hf(hf_dir)
    params, _ = parameters.load(str(hf_dir), LanguageModel(cfg), mesh, "--from-hf")
    return checkpoint.export_params(out, params, dataclasses.replace(cfg, hf_path=None))


def from_gguf(gguf_file: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """A GGUF file -> a HF checkpoint directory (``config.json``, ``model.safetensors`` in
    float32, the tokenizer with its chat template) that ``model.hf_path`` reads.

    ``transformers`` reads GGUF (dequantising every tensor) but refuses to save a model it
    loaded from one; the same architecture made from its config, without the quantisation
    entry, takes the state dict and saves. ``out`` must not exist yet: it is written beside
    and renamed into place, and refused if our model cannot represent it."""
    from rlhf_jax.models.hf_config import model_config_from_hf

    gguf_file, out = pathlib.Path(gguf_file), pathlib.Path(out)
    if not gguf_file.is_file():
        raise ConfigError(f"--from-gguf {gguf_file}: no such file")
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; name a new directory (nothing is overwritten)")
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
          tokenizer_dir: str | None = None) -> pathlib.Path:
    """A language model's export (SFT or PPO policy) or stage checkpoints -> HF checkpoint."""
    from rlhf_jax.models import LanguageModel, hf

    src = parameters.source(str(export_dir), "--to-hf")
    if src.kind == "hf":
        raise ConfigError(f"--to-hf {export_dir}: already a HF checkpoint")
    if src.scalar:
        raise checkpoint.CheckpointError(f"{export_dir}: not a language-model export (a reward model's "
                                         "export has no LM head)")
    cfg = src.model
    try:
        params, _ = parameters.load(str(export_dir), LanguageModel(cfg), mesh, "--to-hf")
    except (ValueError, KeyError) as err:  # Orbax names the tree mismatch
        raise checkpoint.CheckpointError(f"{export_dir}: not a language-model export (a reward or value "
                                         f"model has no LM head): {err}") from err
    return hf.export_hf(params, cfg, out, tokenizer_dir)


def convert_main(args: argparse.Namespace) -> int:
    """Runs a parsed ``convert`` command; returns the exit status."""
    try:
        if args.from_gguf:
            if args.tokenizer:
                raise ConfigError("--tokenizer goes with --to-hf (a GGUF file holds its own tokenizer)")
            print(f"convert: wrote {from_gguf(args.from_gguf, args.out)}")
            return 0
        mesh = _mesh(args.mesh)
        if args.from_hf:
            if args.tokenizer:
                raise ConfigError("--tokenizer goes with --to-hf (an export holds no tokenizer)")
            written = from_hf(args.from_hf, args.out, mesh)
        else:
            written = to_hf(args.to_hf, args.out, mesh, args.tokenizer)
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
