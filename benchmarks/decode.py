"""Greedy decoding with a KV cache: our jitted sampler against ``transformers`` ``generate``.

Same model (our params exported to a HF checkpoint), same prompt tokens, prompt 32, exactly
``new_tokens`` new tokens (no EOS stop on either side), batch 1 and 8. Tokens/s counts new
tokens only, over the median call; a call covers prefill + decode on both sides, and the two
take turns call by call so that both see the same machine load.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from rlhf_jax import parameters, sharding
from rlhf_jax.config import ModelConfig, SamplingConfig
from rlhf_jax.default_config import default_config
from rlhf_jax.models import LanguageModel
from rlhf_jax.sampling import make_sampler

GPT2_6L = ModelConfig(family="gpt2", vocab_size=8192, d_model=512, n_layers=6, n_heads=8, d_ff=2048, max_len=256)
# The embedded default (llama 2L d128 GQA, vocab 152); max_len only bounds gpt2 positions.
TINY = dataclasses.replace(default_config().model, max_len=256)
MODELS = {"gpt2-6L-d512": GPT2_6L, "tiny-default": TINY}
NEVER = -1  # an EOS id no token equals: every row decodes all new tokens


@dataclasses.dataclass(frozen=True)
class DecodeWorkload:
    prompt_len: int = 32
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 5


def prompts(cfg: ModelConfig, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)


def ours(cfg: ModelConfig, params, mesh, shardings, tokens: np.ndarray, work: DecodeWorkload):
    """Our jitted sampler, compiled and run once. Returns (``run() -> new tokens [B, N]``,
    its jit object)."""
    sampler = make_sampler(LanguageModel(cfg), SamplingConfig(max_new_tokens=work.new_tokens, temperature=0.0),
                           mesh, shardings, eos_id=NEVER, pad_id=0)
    batch = sharding.batch_sharding(mesh, 2)
    prompt = jax.device_put(jnp.asarray(tokens), batch)
    segments = jax.device_put(jnp.ones_like(prompt), batch)
    rng = jax.random.PRNGKey(0)

    def run() -> np.ndarray:
        samples = sampler(params, prompt, segments, rng)
        assert bool(jnp.all(samples.mask)), "a row stopped before new_tokens"
        return np.asarray(samples.tokens)  # waits for the call

    run()  # compile + first run
    return run, sampler.jitted


def hf_generate(model_dir: pathlib.Path, tokens: np.ndarray, work: DecodeWorkload):
    """``transformers`` ``generate`` (greedy, KV cache, exactly N new tokens), run once.
    Returns ``run() -> new tokens [B, N]``."""
    torch, device = common.setup_torch()
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    gen = GenerationConfig(do_sample=False, max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens,
                           eos_token_id=None, pad_token_id=0, use_cache=True)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        new = out[:, tokens.shape[1]:].cpu().numpy()  # waits for the call
        assert new.shape[1] == work.new_tokens, new.shape
        return new

    run()  # warm-up
    return run


def _timed(batch: int, work: DecodeWorkload, times: list[float]) -> dict:
    return {"tokens_per_s": batch * work.new_tokens / float(np.median(times)), **common.summary(times)}


def run(work: DecodeWorkload = DecodeWorkload(), models: dict[str, ModelConfig] = MODELS,
        peers: bool = True, log=print) -> dict:
    mesh = common.single_device_mesh()
    missing = common.missing_peers("torch", "transformers") if peers else []
    results = {"workload": dataclasses.asdict(work), "greedy": True, "eos_stop": False, "rows": []}
    for name, cfg in models.items():
        params, shardings = parameters.create(LanguageModel(cfg), mesh, jax.random.PRNGKey(0))
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = common.export_lm(params, cfg, pathlib.Path(tmp) / name) if peers and not missing else None
            for batch in work.batches:
                tokens = prompts(cfg, batch, work.prompt_len)
                row = {"model": name, "batch": batch}
                run_ours, jitted = ours(cfg, params, mesh, shardings, tokens, work)
                runners = {"ours": run_ours}
                if peers and not missing:
                    runners["hf_generate"] = hf_generate(model_dir, tokens, work)
                compiled, counter = common.jit_cache_size(jitted), common.compile_counter()
                with counter.counting():
                    counter.count = 0
                    times, outputs = common.take_turns(runners, work.repeats)
                row["ours"] = {**_timed(batch, work, times["ours"]),
                               "compiles_after_warmup": counter.count + common.jit_cache_size(jitted) - compiled}
                if not peers:
                    row["hf_generate"] = {"skipped": "--ours-only"}
                elif missing:
                    row["hf_generate"] = {"skipped": common.NOT_INSTALLED, "missing": missing}
                else:
                    row["hf_generate"] = _timed(batch, work, times["hf_generate"])
                    # same weights and maths: the greedy tokens agree (float noise can flip a near-tie)
                    row["same_tokens_fraction"] = float(np.mean(outputs["hf_generate"][-1] == outputs["ours"][-1]))
                    row["speedup"] = row["ours"]["tokens_per_s"] / row["hf_generate"]["tokens_per_s"]
                log(f"decode {name} batch {batch}: ours {row['ours']['tokens_per_s']:.0f} tok/s"
                    + (f", generate {row['hf_generate']['tokens_per_s']:.0f} tok/s ({row['speedup']:.2f}x)"
                       if "speedup" in row else ""))
                results["rows"].append(row)
    return results
