"""Process-local batches -> global sharded arrays on a (data 2, fsdp 2, tensor 2) mesh."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from data_testlib import data_cfg, words

from rlhf_jax.config import MeshConfig
from rlhf_jax.data.loader import SFTBatches, to_global
from rlhf_jax.data.ranking import RankingBatches
from rlhf_jax.sharding import batch_sharding, make_mesh


def _demos(n):
    return [{"prompt": words(i % 40, 1 + i % 3), "response": words(50 + i % 40, 1 + i % 4)}
            for i in range(n)]


def _check_sharded(array, expected, mesh):
    assert array.shape == expected.shape
    assert array.sharding == batch_sharding(mesh, expected.ndim)
    np.testing.assert_array_equal(np.asarray(array), expected)
    rows = expected.shape[0] // 4  # the batch is split over data x fsdp = 4 ways
    for shard in array.addressable_shards:
        assert shard.data.shape == (rows, *expected.shape[1:])  # replicated over tensor
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def test_to_global_token_and_ranking_batches(eight_devices, write_jsonl, tok, cache_dir):
    mesh = make_mesh(MeshConfig(2, 2, 2))
    demos = write_jsonl("d.jsonl", _demos(16))
    local = SFTBatches(str(demos), tok, data_cfg(batch_size=8), seed=0, cache_dir=cache_dir).get(1)
    batch = to_global(local, mesh)
    for name in ("tokens", "loss_mask", "segment_ids", "positions"):
        _check_sharded(getattr(batch, name), getattr(local, name), mesh)
    comparisons = write_jsonl("c.jsonl", [
        {"prompt": words(i, 2), "responses": [words(50 + j, 1 + j) for j in range(2 + i % 3)],
         "ranks": list(range(2 + i % 3))} for i in range(8)])
    local = RankingBatches(str(comparisons), tok, data_cfg(batch_size=8), seed=0, k_max=4,
                           cache_dir=cache_dir).get(0)
    ranking = to_global(local, mesh)
    for name in ("tokens", "segment_ids", "positions", "last_index", "ranks", "mask"):
        _check_sharded(getattr(ranking, name), getattr(local, name), mesh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_build_one_global_batch(tmp_path, write_jsonl):
    """Two JAX processes on this machine, 4 CPU devices each: a real multi-host load."""
    jsonl = write_jsonl("d.jsonl", _demos(40))
    worker = pathlib.Path(__file__).with_name("data_multiprocess_worker.py")
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, str(worker), port, str(p), str(jsonl),
                               str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for p in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    for p, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {p} failed:\n{out[-3000:]}"
        assert f"process {p}: ok" in out
