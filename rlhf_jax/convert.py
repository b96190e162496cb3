"""``rlhf-jax convert``: Hugging Face checkpoint <-> our export format.

    rlhf-jax convert --from-hf HF_DIR --out EXPORT_DIR [--overwrite]
    rlhf-jax convert --to-hf EXPORT_DIR --out HF_DIR [--tokenizer TOKENIZER_DIR] [--overwrite]

An export (``checkpoint.export_params``) is what a stage's ``init_from`` reads; a HF
directory is what ``transformers`` and other tools read. Params pass through a mesh of
this host's devices (``--mesh``, default all devices on ``fsdp``), so a model larger than
one device converts.

Nothing of the user's is deleted: ``--out`` is a new or empty directory; an existing export
(``--from-hf``) or existing HF files (``--to-hf``) are replaced only with ``--overwrite``, and
``--to-hf`` touches no file but those it writes.
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
        mesh = _mesh(args.mesh)
        if args.from_hf:
            if args.tokenizer:
                raise ConfigError("--tokenizer goes with --to-hf (an export holds no tokenizer)")
            written = from_hf(args.from_hf, args.out, mesh, args.overwrite)
        else:
            written = to_hf(args.to_hf, args.out, mesh, args.tokenizer, args.overwrite)
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
