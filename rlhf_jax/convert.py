"""``rlhf-jax convert``: Hugging Face checkpoint <-> our export format.

    rlhf-jax convert --from-hf HF_DIR --out EXPORT_DIR
    rlhf-jax convert --to-hf EXPORT_DIR --out HF_DIR [--tokenizer TOKENIZER_DIR]

An export (``checkpoint.export_params``) is what a stage's ``init_from`` reads; a HF
directory is what ``transformers`` and other tools read. Params pass through a mesh of
this host's devices (``--mesh``, default all devices on ``fsdp``), so a model larger than
one device converts.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from rlhf_jax import checkpoint, parameters, sharding
from rlhf_jax.config import ConfigError, MeshConfig


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``convert`` flags, on ``parser``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="a HF checkpoint directory to read")
    source.add_argument("--to-hf", metavar="SOURCE",
                        help="a language model to read: an export, or a stage's checkpoints directory")
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
