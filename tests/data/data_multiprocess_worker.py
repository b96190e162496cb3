"""One of two JAX processes for ``test_data_global.py``: loads its process slice of a batch
and checks the global array it builds against the one-process batch.

Usage: ``python data_multiprocess_worker.py PORT PROCESS_ID JSONL CACHE_DIR``. Both
processes share ``CACHE_DIR``, so they also race to build the same TFDS store. The tokenizer
is a plain :class:`~rlhf_jax.data.tokenizer.TextTokenizer` with the test vocabulary's ids:
importing ``transformers`` (and with it torch) would cost each process seconds.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from data_testlib import EOS, PAD, word_ids  # noqa: E402

from rlhf_jax.config import DataConfig, MeshConfig  # noqa: E402
from rlhf_jax.data.loader import SFTBatches, to_global  # noqa: E402
from rlhf_jax.sharding import batch_sharding, make_mesh  # noqa: E402


class WordTokenizer:
    eos_id, pad_id = EOS, PAD

    def encode(self, text: str) -> list[int]:
        return word_ids(text)


def main(port: str, process_id: str, jsonl: str, cache_dir: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    tok = WordTokenizer()
    cfg = DataConfig(train_path=jsonl, batch_size=8, max_len=16, shuffle=True)
    local = SFTBatches(jsonl, tok, cfg, seed=1, cache_dir=cache_dir,
                       process_index=jax.process_index(), process_count=2)
    reference = SFTBatches(jsonl, tok, cfg, seed=1, cache_dir=cache_dir)  # the whole batch
    mesh = make_mesh(MeshConfig(2, 2, 2))
    for step in (0, 3):
        batch = to_global(local.get(step), mesh)
        whole = reference.get(step)
        for name in ("tokens", "loss_mask", "segment_ids", "positions"):
            array, expected = getattr(batch, name), getattr(whole, name)
            assert array.shape == expected.shape == (8, 16), array.shape
            assert array.sharding == batch_sharding(mesh, 2)
            assert len(array.addressable_shards) == 4
            for shard in array.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
    print(f"process {process_id}: ok", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
