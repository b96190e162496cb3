"""`rlhf-jax convert` never deletes or overwrites what a user owns (issue 30, defect 1):
``--out`` must be new or empty; an existing export or existing HF files are replaced only
with ``--overwrite``; ``--out`` may not be, hold or sit inside the source; every file it
writes is an ordinary 0644 file."""

import os
import stat

import jax
import pytest

from rlhf_jax import checkpoint, convert, parameters, sharding
from rlhf_jax.config import MeshConfig, ModelConfig
from rlhf_jax.models import LanguageModel

MODEL = ModelConfig(family="llama", vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=16)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF checkpoint directory written by our own exporter (no torch needed)."""
    root = tmp_path_factory.mktemp("convert")
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    params, _ = parameters.create(LanguageModel(MODEL), mesh, jax.random.PRNGKey(0))
    checkpoint.export_params(root / "export", params, MODEL)
    assert convert.main(["--to-hf", str(root / "export"), "--out", str(root / "hf")]) == 0
    return root / "hf"


def _tree(directory):
    """Every file under ``directory`` with its bytes: what must survive a refused command."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _convert(*args):
    return convert.main([str(a) for a in args])


def test_from_hf_into_a_users_directory_is_refused_and_deletes_nothing(hf_dir, tmp_path, capsys):
    """The issue's reproduction: ``--out runs/mine`` holding notes.txt used to be emptied."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert _convert("--from-hf", hf_dir, "--out", mine) == 2
    assert "is not empty and holds no export" in capsys.readouterr().err
    assert _tree(mine) == {"notes.txt": b"keep"}
    # --overwrite replaces an export, never someone's files
    assert _convert("--from-hf", hf_dir, "--out", mine, "--overwrite") == 2
    assert _tree(mine) == {"notes.txt": b"keep"}


def test_out_dot_and_out_equal_to_the_source_are_refused(hf_dir, tmp_path, monkeypatch, capsys):
    before = _tree(hf_dir)
    assert _convert("--from-hf", hf_dir, "--out", hf_dir) == 2
    assert "is the source" in capsys.readouterr().err
    assert _convert("--from-hf", hf_dir, "--out", hf_dir / "sub") == 2
    assert "is inside the source" in capsys.readouterr().err
    assert _tree(hf_dir) == before
    work = tmp_path / "work"
    work.mkdir()
    (work / "code.py").write_text("print(1)")
    monkeypatch.chdir(work)
    assert _convert("--from-hf", hf_dir, "--out", ".") == 2
    assert _tree(work) == {"code.py": b"print(1)"}


def test_an_existing_export_is_replaced_only_with_overwrite(hf_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert _convert("--from-hf", hf_dir, "--out", out) == 0
    first = _tree(out)
    assert _convert("--from-hf", hf_dir, "--out", out) == 2
    assert "already holds an export; pass --overwrite" in capsys.readouterr().err
    assert _tree(out) == first
    assert _convert("--from-hf", hf_dir, "--out", out, "--overwrite") == 0
    assert (out / checkpoint.EXPORT_META).is_file()


def test_to_hf_keeps_a_users_config_unless_overwrite_and_touches_nothing_else(hf_dir, tmp_path, capsys):
    export = tmp_path / "export"
    assert _convert("--from-hf", hf_dir, "--out", export) == 0
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep")
    assert _convert("--to-hf", export, "--out", out) == 2
    assert "already holds ['config.json']; pass --overwrite" in capsys.readouterr().err
    assert _tree(out) == {"config.json": b'{"mine": true}', "notes.txt": b"keep"}
    assert _convert("--to-hf", export, "--out", out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "keep"
    assert (out / "config.json").read_text() != '{"mine": true}'
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):  # 0600 before: the temporary file's mode
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode), oct(umask))


def test_to_hf_refuses_a_directory_holding_other_weights(hf_dir, tmp_path, capsys):
    export = tmp_path / "export"
    assert _convert("--from-hf", hf_dir, "--out", export) == 0
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"theirs")
    assert _convert("--to-hf", export, "--out", out, "--overwrite") == 2
    assert "holds other weights (model-00001-of-00002.safetensors)" in capsys.readouterr().err
    assert _tree(out) == {"model-00001-of-00002.safetensors": b"theirs"}


def test_the_export_writer_never_replaces_a_directory_that_is_not_an_export(tmp_path):
    """The library guard under every stage's export and the converter."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    params, _ = parameters.create(LanguageModel(MODEL), mesh, jax.random.PRNGKey(0))
    target = tmp_path / "target"
    target.mkdir()
    (target / "data.csv").write_text("1,2")
    with pytest.raises(checkpoint.CheckpointError, match="holds files that are not an export"):
        checkpoint.export_params(target, params, MODEL)
    assert _tree(target) == {"data.csv": b"1,2"}
    checkpoint.export_params(tmp_path / "fresh", params, MODEL)
    checkpoint.export_params(tmp_path / "fresh", params, MODEL)  # an export replaces its own export
