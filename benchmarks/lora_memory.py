"""LoRA against full fine-tuning: the SFT step's peak memory and time, the trainable
parameters and the optimiser state's bytes, on SmolLM2-135M's architecture (random weights:
every figure but the loss depends on shapes only, so no download is needed).

Peak memory is XLA's account of the compiled step (``compiled.memory_analysis()``): its
arguments + outputs - the donated buffers it writes in place + temporaries, i.e. what the
step holds at once on the device; the same accounting on a CPU, GPU or TPU. Time is the
median of the timed steps after warm-up, the two variants stepping in turns (so both see the
same load on a shared machine). AdamW as the stages build it (``optim.make_optimizer``), LoRA
at rank 16 on every projection (``all-linear``), f32, one device.

    python -m benchmarks.lora_memory --out benchmarks/results        # ~2-4 min on 2 CPU cores
    python -m benchmarks.lora_memory --quick --out /tmp/lora         # a tiny model, seconds

Writes ``<out>/lora_memory.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from benchmarks import common
from rlhf_jax import sharding, steps
from rlhf_jax.config import LoRAConfig, ModelConfig, OptimConfig
from rlhf_jax.host import keep_freed_memory
from rlhf_jax.models import LanguageModel, lora
from rlhf_jax.optim import make_optimizer
from rlhf_jax.types import TokenBatch

SMOLLM2 = ModelConfig(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                      max_len=2048, tie_embeddings=True, rope_theta=100000.0, scan_layers=True)
QUICK = ModelConfig(family="llama", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_len=64, tie_embeddings=True)
ADAPTERS = LoRAConfig(rank=16, alpha=32.0, target_modules=("all-linear",))
OPTIM = OptimConfig(learning_rate=1e-4, final_lr_fraction=1.0)


@dataclasses.dataclass(frozen=True)
class Workload:
    model: ModelConfig = SMOLLM2
    batch: int = 2
    seq: int = 128
    warmup_steps: int = 1
    timed_steps: int = 5


def prepare(work: Workload, adapters: LoRAConfig) -> tuple[Callable[[], Any], dict[str, Any]]:
    """One variant (``adapters`` rank 0: full fine-tuning), compiled and warmed up. Returns
    (``step()``: one step, waited on; its sizes and compiled memory)."""
    mesh = common.single_device_mesh()
    model = LanguageModel(dataclasses.replace(work.model, lora=adapters))
    tx = make_optimizer(OPTIM, 1000)
    state, state_sh = steps.create_train_state(model, tx, mesh, jax.random.PRNGKey(0))
    trainable, frozen = lora.split_trainable(state.params)
    tokens = np.random.default_rng(0).integers(0, work.model.vocab_size, (work.batch, work.seq)).astype(np.int32)
    ones = np.ones_like(tokens)
    batch = jax.device_put(TokenBatch(tokens, ones.astype(np.float32), ones,
                                      np.broadcast_to(np.arange(work.seq, dtype=np.int32), tokens.shape)),
                           sharding.batch_sharding(mesh))
    step = steps.make_sft_step(model, tx, mesh, state_sh, right_padded=True)
    with sharding.activate(mesh):
        memory = step.jitted.lower(state, batch).compile().memory_analysis()
    sizes = {"trainable_params": lora.count_params(trainable),
             "total_params": lora.count_params(trainable) + lora.count_params(frozen),
             "params_bytes": lora.tree_bytes(state.params), "optimizer_state_bytes": lora.tree_bytes(state.opt_state),
             "step_memory_bytes": {"peak": memory.argument_size_in_bytes + memory.output_size_in_bytes
                                   - memory.alias_size_in_bytes + memory.temp_size_in_bytes,
                                   "arguments": memory.argument_size_in_bytes,
                                   "outputs": memory.output_size_in_bytes, "donated": memory.alias_size_in_bytes,
                                   "temporaries": memory.temp_size_in_bytes}}
    current = {"state": state}

    def run_step() -> float:
        current["state"], metrics = step(current["state"], batch)
        return float(metrics["train/loss"])  # waits for the step

    for _ in range(work.warmup_steps):
        run_step()
    return run_step, sizes


def run(work: Workload) -> dict[str, Any]:
    variants = {"full_finetuning": LoRAConfig(), "lora_rank16": ADAPTERS}
    prepared = {name: prepare(work, adapters) for name, adapters in variants.items()}
    # in turns, so both see the same load of a shared machine
    times, losses = common.take_turns({name: step for name, (step, _) in prepared.items()}, work.timed_steps)
    rows = {name: {**sizes, "step_s": common.summary(times[name]), "last_loss": losses[name][-1]}
            for name, (_, sizes) in prepared.items()}
    full, adapted = rows["full_finetuning"], rows["lora_rank16"]
    ratio = lambda key: adapted[key] / full[key]  # noqa: E731
    return {
        "model": "SmolLM2-135M architecture" if work.model == SMOLLM2 else "quick (tiny) model",
        "model_config": dataclasses.asdict(work.model), "batch": work.batch, "seq": work.seq,
        "optimizer": "AdamW (optim.make_optimizer), f32", "lora": dataclasses.asdict(ADAPTERS),
        **rows,
        "lora_over_full": {"trainable_params": ratio("trainable_params"),
                           "optimizer_state_bytes": ratio("optimizer_state_bytes"),
                           "step_peak_memory": adapted["step_memory_bytes"]["peak"] / full["step_memory_bytes"]["peak"],
                           "step_time": adapted["step_s"]["median_s"] / full["step_s"]["median_s"]},
        "machine": common.machine_info(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="directory for lora_memory.json")
    parser.add_argument("--quick", action="store_true", help="a tiny model (a smoke run)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    work = Workload(model=QUICK, batch=2, seq=32, warmup_steps=1, timed_steps=2) if args.quick else Workload()
    result = run(work)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_memory.json").write_text(json.dumps(result, indent=2))
    ratios = result["lora_over_full"]
    print(f"lora_memory: trainable {result['lora_rank16']['trainable_params']:,} of "
          f"{result['full_finetuning']['trainable_params']:,} ({ratios['trainable_params']:.1%}); optimiser state "
          f"{ratios['optimizer_state_bytes']:.1%}; step peak memory {ratios['step_peak_memory']:.1%}, step time "
          f"{ratios['step_time']:.2f}x of full fine-tuning -> {out / 'lora_memory.json'}")
    return result


if __name__ == "__main__":
    main()
