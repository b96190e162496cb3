"""Ours against the hardware's own limits (no peer), the issue's accelerator measurements:

1. SFT train step, model FLOPs utilisation (MFU) in bf16 for a ~350M model (GPT-2 medium
   shape) and a ~1B model (TinyLlama 1.1B shape: llama, GQA 32/4, SwiGLU, untied head):
   MaxText FLOPs per token (``sft_step.model_flops_per_token``, remat not counted) times
   tokens/s, over the device's peak bf16 FLOP/s. Params and Adam in f32, compute in bf16
   (``ModelConfig.compute_dtype``), as mixed-precision training runs.
2. Greedy decoding with the KV cache at batch 1 and 8 (prompt 32, 128 new tokens, bf16
   params and cache): the time of one decode step against the memory-bandwidth bound,
   the bytes a step must read (every weight the step multiplies by, i.e. all params but the
   gathered input-embedding rows, plus the cache's valid prefix, averaged over the steps)
   over the peak bandwidth. One decode step's time is ``(t(128 new) - t(1 new)) / 127``, so
   prefill and dispatch are not counted against it.

Each is judged against the device's nominal peak (the vendor's dense bf16 FLOP/s and HBM
bandwidth, :data:`NOMINAL`) where the device is known, else against the peak measured here
(a bf16 n x n ``jnp.dot``; the read bandwidth of a jitted sum over a large bf16 array); both
are always reported. Full size needs an accelerator: on a CPU the section reports itself
skipped unless ``--quick`` shrinks the models (a smoke test of this code, not judged).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, decode, sft_step, torch_peer
from rlhf_jax import parameters
from rlhf_jax.config import ModelConfig
from rlhf_jax.models import LanguageModel, attention

# (substring of jax's device_kind, dense bf16 FLOP/s, HBM bytes/s): vendor data sheets.
# The first match wins, so the more specific names come first.
NOMINAL = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100-PCIE-40GB", 312e12, 1.555e12),
    ("A100", 312e12, 1.555e12),
    ("TPU v4", 275e12, 1.2e12),
    ("TPU v5 lite", 197e12, 0.819e12),  # v5e
    ("TPU v5", 459e12, 2.765e12),  # v5p
    ("TPU v6 lite", 918e12, 1.64e12),  # v6e
)

# scan_layers: unrolled, the 24-layer SFT step did not compile within 190 s on an H200 (issue 17)
GPT2_350M = ModelConfig(family="gpt2", vocab_size=50304, d_model=1024, n_layers=24, n_heads=16, d_ff=4096,
                        max_len=1024, compute_dtype="bfloat16", scan_layers=True)
LLAMA_1B = ModelConfig(family="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                       d_ff=5632, max_len=2048, tie_embeddings=False, compute_dtype="bfloat16", scan_layers=True)


@dataclasses.dataclass(frozen=True)
class RooflineWorkload:
    # (name, model, batch, sequence length) of each SFT step measured. Sequences of 1024:
    # on a GPU the rows take cuDNN's attention (they are declared right-padded), but XLA's
    # fallback keeps each layer's [B, H, T, T] scores for the backward pass (~1.6 GB a
    # layer for the 1.1B model at 8 x 1024; 4x at 2048).
    train: tuple[tuple[str, ModelConfig, int, int], ...] = (("gpt2-350M", GPT2_350M, 16, 1024),
                                                             ("llama-1.1B", LLAMA_1B, 8, 1024))
    decode_models: tuple[tuple[str, ModelConfig], ...] = (("gpt2-350M", GPT2_350M), ("llama-1.1B", LLAMA_1B))
    prompt_len: int = 32
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    warmup_steps: int = 2
    timed_steps: int = 5
    repeats: int = 5
    peak_n: int = 8192
    bandwidth_bytes: int = 2 ** 31
    needs_accelerator: bool = True  # full size on a CPU would take hours


def nominal_peak(device_kind: str) -> dict | None:
    """The vendor's dense bf16 FLOP/s and HBM bytes/s for ``device_kind``, or None."""
    for name, flops, bandwidth in NOMINAL:
        if name.lower() in device_kind.lower():
            return {"device": name, "bf16_flops": flops, "bytes_per_s": bandwidth}
    return None


def read_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes/s a jitted f32-accumulated sum reads from a bf16 array of ``nbytes`` (best of ``repeats``)."""
    x = jnp.ones((nbytes // 2 // 1024, 1024), jnp.bfloat16)
    total = jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32))
    jax.block_until_ready(total(x))
    return x.size * x.dtype.itemsize / min(common.time_calls(lambda: total(x), repeats))


def peaks(work: RooflineWorkload, log=print) -> dict:
    device = jax.devices()[0]
    measured = {"bf16_flops": common.jax_matmul_peak(work.peak_n, dtype=jnp.bfloat16), "bytes_per_s": read_bandwidth(work.bandwidth_bytes),
                "how": f"bf16 jnp.dot {work.peak_n}^3; jitted sum over a {work.bandwidth_bytes / 2 ** 20:.0f} MiB "
                       "bf16 array"}
    nominal = nominal_peak(str(device.device_kind))
    log(f"roofline peaks on {device.device_kind}: measured {measured['bf16_flops'] / 1e12:.1f} TFLOP/s, "
        f"{measured['bytes_per_s'] / 1e9:.0f} GB/s; nominal {nominal}")
    return {"device_kind": str(device.device_kind), "measured": measured, "nominal": nominal,
            "judged_against": "nominal" if nominal else "measured"}


def judged(peak: dict) -> dict:
    return peak[peak["judged_against"]]


def param_count(cfg: ModelConfig) -> int:
    shapes = jax.eval_shape(LanguageModel(cfg).init, jax.random.PRNGKey(0), jnp.ones((1, 1), jnp.int32))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


def train_mfu(name: str, cfg: ModelConfig, batch: int, seq: int, work: RooflineWorkload, peak: dict,
              log=print) -> dict:
    """One model's SFT step (our jitted ``make_sft_step``): tokens/s and MFU."""
    sft = sft_step.SFTWorkload(model=cfg, batch=batch, seq=seq, warmup_steps=work.warmup_steps,
                               timed_steps=work.timed_steps)
    step, _, jitted, warmup_s = sft_step.ours(sft, keep_initial=False)
    compiled, counter = common.jit_cache_size(jitted), common.compile_counter()
    with counter.counting():
        counter.count = 0
        times = common.time_calls(step, work.timed_steps, sync=lambda _: None)  # step() waits for its loss
    tokens_per_s = batch * seq / float(np.median(times))
    flops = sft_step.model_flops_per_token(cfg, seq) * tokens_per_s
    # what the step's rows (one sequence each, declared right-padded) take on this backend
    path = attention.choose_attention(cfg.attention_impl, jax.default_backend(), cfg.compute_dtype,
                                      cfg.dim_per_head, right_padded=True)
    row = {"model": name, "config": dataclasses.asdict(cfg), "batch": batch, "seq": seq, "attention_path": path,
           "params": param_count(cfg), "tokens_per_s": tokens_per_s, "model_flops_per_s": flops,
           "mfu": flops / judged(peak)["bf16_flops"], "mfu_of_measured_peak": flops / peak["measured"]["bf16_flops"],
           "warmup_s": warmup_s, **common.summary(times),
           "compiles_after_warmup": counter.count + common.jit_cache_size(jitted) - compiled}
    log(f"roofline SFT {name} {batch}x{seq} ({path} attention): {tokens_per_s:.0f} tok/s, MFU {row['mfu']:.1%}")
    return row


def decode_bytes_per_step(cfg: ModelConfig, params, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """The bytes one greedy decode step must read, averaged over the ``new_tokens - 1`` steps
    after prefill: every param but the input-embedding tables (a step gathers ``batch`` rows
    of those; with tied embeddings the table is read whole as the unembedding), plus the
    keys and values of the cache's valid prefix (``prompt_len + i`` slots at step i)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    weights = 0
    for path, leaf in flat:
        keys = "/".join(str(getattr(k, "key", k)) for k in path)
        gathered = keys.endswith("position_embed/embedding") or (
            keys.endswith("embed/embedding") and not cfg.tie_embeddings)
        weights += (batch * cfg.d_model if gathered else leaf.size) * leaf.dtype.itemsize
    mean_context = prompt_len + new_tokens / 2  # steps 1..N-1 attend to P+1..P+N-1 slots
    per_slot = 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * jnp.dtype(cfg.compute_dtype).itemsize
    return {"weights": weights, "kv_cache_mean": batch * mean_context * per_slot,
            "total": weights + batch * mean_context * per_slot}


def decode_bound(name: str, cfg: ModelConfig, work: RooflineWorkload, peak: dict, log=print) -> list[dict]:
    """Per batch size: one decode step's time against the bandwidth bound."""
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16",
                              max_len=max(cfg.max_len, work.prompt_len + work.new_tokens))
    mesh = common.single_device_mesh()
    params, shardings = parameters.create(LanguageModel(cfg), mesh, jax.random.PRNGKey(0))
    rows = []
    for batch in work.batches:
        tokens = decode.prompts(cfg, batch, work.prompt_len)
        lengths = {"full": work.new_tokens, "one": 1}
        runners, jitted = {}, []
        for key, n in lengths.items():
            run, jit_obj = decode.ours(cfg, params, mesh, shardings, tokens,
                                       decode.DecodeWorkload(prompt_len=work.prompt_len, new_tokens=n))
            runners[key] = run
            jitted.append(jit_obj)
        compiled, counter = sum(common.jit_cache_size(j) for j in jitted), common.compile_counter()
        with counter.counting():
            counter.count = 0
            times, _ = common.take_turns(runners, work.repeats)
        full, one = float(np.median(times["full"])), float(np.median(times["one"]))
        step_s = (full - one) / (work.new_tokens - 1)
        nbytes = decode_bytes_per_step(cfg, params, batch, work.prompt_len, work.new_tokens)
        bound_s = nbytes["total"] / judged(peak)["bytes_per_s"]
        row = {"model": name, "batch": batch, "prompt_len": work.prompt_len, "new_tokens": work.new_tokens,
               "call_s": {"full": full, "one_token": one}, "step_s": step_s,
               "tokens_per_s": batch / step_s, "bytes_per_step": nbytes,
               "bound_step_s": bound_s, "fraction_of_bound": bound_s / step_s,
               "fraction_of_measured_bound": nbytes["total"] / peak["measured"]["bytes_per_s"] / step_s,
               "compiles_after_warmup": counter.count + sum(common.jit_cache_size(j) for j in jitted) - compiled}
        log(f"roofline decode {name} batch {batch}: {step_s * 1e3:.2f} ms/step, bound {bound_s * 1e3:.2f} ms "
            f"({row['fraction_of_bound']:.0%})")
        rows.append(row)
    return rows


def torch_peers(work: RooflineWorkload, log=print) -> dict[str, dict]:
    """The PyTorch SFT step of each train row (``benchmarks.torch_peer``, each in a fresh
    process). Must run before this process touches the GPU: JAX reserves 75% of it then."""
    peers = {}
    for name, cfg, batch, seq in work.train:
        peers[name] = torch_peer.run_in_process(json.dumps(dataclasses.asdict(cfg)), batch, seq,
                                                work.warmup_steps, work.timed_steps, timeout_s=300)
        log(f"roofline PyTorch peer {name}: {peers[name].get('tokens_per_s', peers[name].get('skipped'))}")
    return peers


def _with_peer(row: dict, peer: dict, cfg: ModelConfig, peak: dict) -> dict:
    if "tokens_per_s" in peer:
        flops = sft_step.model_flops_per_token(cfg, row["seq"]) * peer["tokens_per_s"]
        peer = {**peer, "mfu": flops / judged(peak)["bf16_flops"]}
        row = {**row, "speedup_vs_torch": row["tokens_per_s"] / peer["tokens_per_s"]}
    return {**row, "torch_peer": peer}


def run(work: RooflineWorkload = RooflineWorkload(), log=print, peers: bool = False) -> dict:
    """``peers``: also the PyTorch step of each train row, where CUDA torch is present."""
    peer_rows = torch_peers(work, log) if peers else {}
    backend = jax.default_backend()
    result = {"workload": {"train": [{"model": n, "batch": b, "seq": s} for n, _, b, s in work.train],
                           "decode_models": [n for n, _ in work.decode_models], "prompt_len": work.prompt_len,
                           "new_tokens": work.new_tokens, "batches": list(work.batches),
                           "timed_steps": work.timed_steps, "repeats": work.repeats},
              "backend": backend}
    if work.needs_accelerator and backend == "cpu":
        return {**result, "skipped": "no accelerator: the ~350M / ~1B bf16 workloads are measured on a GPU or "
                                     "TPU (--quick runs shrunk models on a CPU)"}
    peak = peaks(work, log)
    result["peak"] = peak
    result["train"] = [train_mfu(name, cfg, b, s, work, peak, log) for name, cfg, b, s in work.train]
    if peer_rows:
        result["train"] = [_with_peer(row, peer_rows[name], cfg, peak)
                           for row, (name, cfg, _, _) in zip(result["train"], work.train)]
    result["decode"] = [row for name, cfg in work.decode_models for row in decode_bound(name, cfg, work, peak, log)]
    return result
