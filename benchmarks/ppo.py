"""One PPO iteration (rollout + scoring + update): ours against TRL's PPOTrainer, split by phase.

The workload is one iteration of the embedded default's PPO stage (``default_config().ppo``:
256 episodes of 16 prompt + 10 response tokens, 4 minibatches of 64, 1 epoch). Same models
on both sides: the embedded default (llama 2 layers, d128, GQA, vocab 152) as policy and
reference, and two scalar models of that architecture (random heads) as value and reward
model; ours are exported to HF ``LlamaForCausalLM`` and ``LlamaForSequenceClassification``
for TRL (their outputs agree to ~1e-6, checked each run). Same prompts, sampling at
temperature 1 for exactly the response length (no EOS stop: TRL ``stop_token=None``, ours an
EOS id that never occurs), AdamW (b2 0.95, no clipping, as TRL's loop has none), k1 KL,
beta 0.02, GAE, clipped ratio and value (0.2), whitened advantages, missing-EOS penalty 1,
no policy EMA. Both take the behaviour policy's log-probs from the sampling pass (ours:
``PPOConfig.old_logprobs = "sampler"``), so scoring runs three forward passes on each side.

Phases. Ours: the stage's three jitted calls (sampler, experience, update), each waited on.
Ours and TRL take turns iteration by iteration (TRL's ``on_step_end`` callback runs one of
ours), so both see the same machine load. TRL: its ``train()`` loop, instrumented from
outside: rollout = its ``batch_generation`` call; scoring = from there to the first forward
of the policy+value wrapper (reference forward, value and reward forwards, rewards, GAE,
whitening, and TRL's ``gc.collect()``); update = from there to the ``on_step_end`` callback
(minibatch forward/backward/steps and its metric logging). ``other`` is the rest of TRL's
iteration (fetching prompts).
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, sft_step
from rlhf_jax import parameters, sharding
from rlhf_jax.config import OptimConfig, PPOConfig, SamplingConfig
from rlhf_jax.default_config import default_config
from rlhf_jax.evaluation import copy_params
from rlhf_jax.models import LanguageModel, ScalarModel
from rlhf_jax.optim import make_optimizer
from rlhf_jax.policy import reward_model_score
from rlhf_jax.ppo_steps import make_experience_fn, make_ppo_update
from rlhf_jax.sampling import make_sampler
from rlhf_jax.steps import create_train_state
from rlhf_jax.types import PPOState, TokenBatch

NEVER = -1  # an EOS id no token equals: every response has exactly response_len tokens
PAD, EOS = 0, 1


_DEFAULT_PPO = default_config().ppo
_DEFAULT_SAMPLING = default_config().generation.sampling


@dataclasses.dataclass(frozen=True)
class PPOWorkload:
    """One iteration of the embedded default's PPO stage (episodes, minibatches, lengths)."""

    episodes: int = _DEFAULT_PPO.prompts.batch_size
    prompt_len: int = _DEFAULT_PPO.prompts.max_len
    response_len: int = _DEFAULT_SAMPLING.max_new_tokens
    minibatch: int = _DEFAULT_PPO.minibatch_size
    epochs: int = _DEFAULT_PPO.epochs
    learning_rate: float = _DEFAULT_PPO.policy_optim.learning_rate
    lam: float = _DEFAULT_PPO.lam
    timed_iterations: int = 3
    peak_n: int = 2048  # the n x n f32 matmul that measures the peak (as the SFT section)


def model_config():
    return default_config().model


def sampling_config(work: PPOWorkload) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=work.response_len, temperature=1.0)


def ppo_config(work: PPOWorkload) -> PPOConfig:
    optim = OptimConfig(learning_rate=work.learning_rate, b2=0.95, final_lr_fraction=1.0, grad_clip=0.0)
    return PPOConfig(policy_optim=optim, value_optim=optim, minibatch_size=work.minibatch, epochs=work.epochs,
                     kl_coef=0.02, kl_estimator="k1", gamma=1.0, lam=work.lam, clip=0.2, value_clip=0.2,
                     entropy_coef=0.0, whiten_advantages=True, missing_eos_penalty=1.0, ptx_coef=0.0,
                     ema_decay=0.0)  # TRL keeps no EMA of the policy


def prompts(work: PPOWorkload, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(4, vocab, (work.episodes, work.prompt_len)).astype(np.int32)


def models(mesh):
    """(policy params, value params, reward params): random, scalar heads random (bias 0)."""
    cfg = model_config()
    policy, _ = parameters.create(LanguageModel(cfg), mesh, jax.random.PRNGKey(0))
    scalars = []
    for seed in (1, 2):
        params, _ = parameters.create(ScalarModel(cfg), mesh, jax.random.PRNGKey(seed))
        kernel = params["head"]["kernel"]
        params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(10 + seed), kernel.shape) * 0.1
        scalars.append(params)
    return policy, scalars[0], scalars[1]


def build_ours(work: PPOWorkload, mesh, policy_params, value_params, reward_params, prompt_tokens):
    """(initial PPOState, ``iteration(state, i) -> (state, phase seconds)``, the jitted steps):
    the PPO stage's three jitted calls, each waited on (as ``stages/ppo.py`` times them)."""
    cfg, ppo = model_config(), ppo_config(work)
    policy, scalar = LanguageModel(cfg), ScalarModel(cfg)
    updates = work.epochs * work.episodes // work.minibatch
    policy_tx, value_tx = make_optimizer(ppo.policy_optim, 1000), make_optimizer(ppo.value_optim, 1000)
    rng = jax.random.PRNGKey(0)
    policy_state, policy_sh = create_train_state(policy, policy_tx, mesh, rng, copy_params(policy_params))
    value_state, value_sh = create_train_state(scalar, value_tx, mesh, rng, copy_params(value_params))
    replicated = sharding.replicated(mesh)
    state = PPOState(policy=policy_state, value=value_state, ema_params=copy_params(policy_params),
                     kl_coef=jax.device_put(jnp.float32(ppo.kl_coef), replicated))
    state_sh = PPOState(policy=policy_sh, value=value_sh, ema_params=policy_sh.params, kl_coef=replicated)
    ref_params = copy_params(policy_params)
    sampling = sampling_config(work)
    sampler = make_sampler(policy, sampling, mesh, policy_sh.params, NEVER, PAD)
    experience = make_experience_fn(policy, scalar, reward_model_score(scalar), ppo, sampling, 0.0, 1.0, mesh)
    update = make_ppo_update(policy, scalar, policy_tx, value_tx, ppo, sampling, mesh, state_sh)
    no_ptx = TokenBatch(*(jnp.zeros((updates, 2), jnp.int32) for _ in range(4)))
    iteration = timed_iteration(sampler, experience, update, prompt_tokens, mesh, ref_params, reward_params, no_ptx,
                                rng)
    return state, iteration, (sampler.jitted, experience.jitted, update.jitted)


def timed_iteration(sampler, experience, update, prompt_tokens: np.ndarray, mesh, ref_params, reward_params, extra,
                    rng):
    """``iteration(state, i) -> (state, phase seconds)``: an online stage's three jitted calls
    (sampler, experience, update) on ``prompt_tokens``, each waited on (as the stage's
    ``time_phases`` times them). ``extra``: the update's pretraining rows (or None)."""
    batch = sharding.batch_sharding(mesh, 2)
    tokens = jax.device_put(jnp.asarray(prompt_tokens), batch)
    segments = jax.device_put(jnp.ones_like(tokens), batch)

    def iteration(state, i):
        it_rng = jax.random.fold_in(rng, i)
        t0 = time.perf_counter()
        samples = jax.block_until_ready(sampler(state.policy.params, tokens, segments, jax.random.fold_in(it_rng, 0)))
        t1 = time.perf_counter()
        rollout, observed_kl, _ = jax.block_until_ready(experience(state, ref_params, reward_params, samples))
        t2 = time.perf_counter()
        state, _ = jax.block_until_ready(update(state, rollout, extra, observed_kl, jax.random.fold_in(it_rng, 1)))
        t3 = time.perf_counter()
        return state, {"rollout_s": t1 - t0, "scoring_s": t2 - t1, "update_s": t3 - t2, "iteration_s": t3 - t0}

    return iteration


def warmed_up(state, iteration):
    """(``next() -> phase seconds``, the first iteration's seconds, which compiled the steps)."""
    state, first = iteration(state, 0)
    count = 0

    def next_iteration() -> dict:
        nonlocal state, count
        count += 1
        state, phases = iteration(state, count)
        return phases

    return next_iteration, first["iteration_s"]


def ours(work: PPOWorkload, mesh, policy_params, value_params, reward_params, prompt_tokens):
    """Our PPO iteration, compiled by a first one. Returns (``iteration() -> phase seconds``,
    that first iteration's seconds, the jitted steps)."""
    state, iteration, jitted = build_ours(work, mesh, policy_params, value_params, reward_params, prompt_tokens)
    return (*warmed_up(state, iteration), jitted)


def model_flops(work: PPOWorkload, cfg) -> dict[str, float]:
    """Model FLOPs of one iteration by phase, as :func:`sft_step.forward_flops_per_token`
    counts them, unembedding only the response positions (what the algorithm needs; TRL's
    full-sequence logits are extra work it does, not counted). Scalar heads are negligible.
    rollout: the prompt and the first R - 1 response tokens pass once, R tokens unembedded;
    scoring: reference, value and reward model over P + R tokens; update: policy and value
    forward + backward (3 forwards each) over every episode, per epoch."""
    seq = work.prompt_len + work.response_len
    body, unembed = sft_step.forward_flops_per_token(cfg, seq)
    episodes, response = work.episodes, work.response_len
    rollout = episodes * ((seq - 1) * body + response * unembed)
    scoring = episodes * (3 * seq * body + response * unembed)
    update = work.epochs * episodes * 3 * (2 * seq * body + response * unembed)
    return {"rollout": rollout, "scoring": scoring, "update": update, "iteration": rollout + scoring + update}


def _median_phases(rows: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in rows])) for key in rows[0]}


def trl_ppo(work: PPOWorkload, policy_dir: pathlib.Path, value_dir: pathlib.Path, reward_dir: pathlib.Path,
            prompt_tokens: np.ndarray, alongside) -> tuple[dict, list[dict]]:
    """TRL's PPOTrainer, taking turns with ``alongside()`` (our iteration), which its
    ``on_step_end`` callback runs, so both see the same machine load. Returns (TRL's phases,
    our phases of the iterations run alongside TRL's timed ones)."""
    torch, device = common.setup_torch()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_module

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks: list[tuple[str, float]] = []  # (event, time) in order

    original_generation, original_forward = trl_module.batch_generation, trl_module.forward

    def timed_generation(*args, **kwargs):
        sync()
        marks.append(("generate_start", time.perf_counter()))
        out = original_generation(*args, **kwargs)
        sync()
        marks.append(("generate_end", time.perf_counter()))
        return out

    def timed_forward(model, *args, **kwargs):
        if isinstance(model, trl_module.PolicyAndValueWrapper) and marks and marks[-1][0] == "generate_end":
            sync()
            marks.append(("update_start", time.perf_counter()))
        return original_forward(model, *args, **kwargs)

    ours_phases = []

    class Turns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(("resumed", time.perf_counter()))

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            marks.append(("step_end", time.perf_counter()))
            ours_phases.append(alongside())
            marks.append(("resumed", time.perf_counter()))

    iterations = 1 + work.timed_iterations
    dataset = Dataset.from_dict({"input_ids": prompt_tokens.tolist()})
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, **load)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, **load)
    value = AutoModelForSequenceClassification.from_pretrained(value_dir, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir, **load)
    trl_module.batch_generation, trl_module.forward = timed_generation, timed_forward
    try:
        with tempfile.TemporaryDirectory() as out:
            args = TRLPPOConfig(
                output_dir=out, per_device_train_batch_size=work.episodes, gradient_accumulation_steps=1,
                num_mini_batches=work.episodes // work.minibatch, num_ppo_epochs=work.epochs,
                local_rollout_forward_batch_size=work.episodes, total_episodes=work.episodes * iterations,
                response_length=work.response_len, temperature=1.0, stop_token=None, missing_eos_penalty=1.0,
                kl_coef=0.02, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=work.lam,
                whiten_rewards=False, learning_rate=work.learning_rate, adam_beta2=0.95, lr_scheduler_type="constant",
                num_sample_generations=0, bf16=False, fp16=False, use_cpu=device.type == "cpu", report_to="none",
                save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0)
            trainer = PPOTrainer(args=args, processing_class=common.word_tokenizer(model_config().vocab_size, PAD, EOS),
                                 model=policy, ref_model=ref, reward_model=reward, value_model=value,
                                 train_dataset=dataset, eval_dataset=dataset, callbacks=[Turns()])
            trainer.train()
    finally:
        trl_module.batch_generation, trl_module.forward = original_generation, original_forward
    torch.set_num_threads(common.peer_threads())
    rows = trl_phase_rows(marks, "update_start", "step_end", iterations)
    return ({**_median_phases(rows[1:]), "first_iteration_s": rows[0]["iteration_s"], "iterations_timed": len(rows) - 1,
             "timing": "median iteration after the first, taking turns with ours iteration by iteration (from the "
                       "end of our turn to TRL's next on_step_end)"}, ours_phases[1:])


def trl_phase_rows(marks: list[tuple[str, float]], update_start: str, iteration_end: str,
                   iterations: int) -> list[dict]:
    """A TRL trainer's phases per iteration from its ``(event, time)`` marks: rollout from
    ``generate_start`` to ``generate_end``, scoring from there to ``update_start``, update from
    there to ``iteration_end``; the iteration from ``resumed`` (the end of our turn), and
    ``other`` what the three leave out. Refuses a count other than ``iterations``."""
    rows, current = [], {}
    for event, t in marks:
        current[event] = t
        if event == iteration_end:
            phases = {"rollout_s": current["generate_end"] - current["generate_start"],
                      "scoring_s": current[update_start] - current["generate_end"],
                      "update_s": t - current[update_start], "iteration_s": t - current["resumed"]}
            phases["other_s"] = phases["iteration_s"] - sum(phases[k] for k in ("rollout_s", "scoring_s", "update_s"))
            rows.append(phases)
            current = {}
    if len(rows) != iterations:
        raise RuntimeError(f"TRL instrumentation saw {len(rows)} iterations, expected {iterations}")
    return rows


def max_output_differences(policy, value, reward, dirs, prompt_tokens) -> dict[str, float]:
    """Largest |ours - HF| of the policy's logits and the value and reward models' outputs on
    the prompts: the peer runs the same models."""
    torch, device = common.setup_torch()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = model_config()
    ids = torch.as_tensor(prompt_tokens, dtype=torch.long, device=device)
    out = {}
    with torch.inference_mode():
        hf = AutoModelForCausalLM.from_pretrained(dirs[0], dtype=torch.float32).to(device).eval()
        ours_logits, _ = LanguageModel(cfg).apply({"params": policy}, jnp.asarray(prompt_tokens))
        out["policy_logits"] = float(np.max(np.abs(hf(ids).logits.cpu().numpy() - np.asarray(ours_logits))))
        for name, params, directory in (("value", value, dirs[1]), ("reward", reward, dirs[2])):
            hf = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).to(device).eval()
            hidden = getattr(hf, hf.base_model_prefix)(ids).last_hidden_state
            ours_values, _ = ScalarModel(cfg).apply({"params": params}, jnp.asarray(prompt_tokens))
            out[name] = float(np.max(np.abs(hf.score(hidden)[..., 0].cpu().numpy() - np.asarray(ours_values))))
    return out


def run(work: PPOWorkload = PPOWorkload(), peers: bool = True, log=print) -> dict:
    mesh = common.single_device_mesh()
    cfg = model_config()
    policy, value, reward = models(mesh)
    prompt_tokens = prompts(work, cfg.vocab_size)
    result = {"workload": {**dataclasses.asdict(work), "model": "embedded default (llama 2L d128 GQA 4/2 heads, V152)",
                           "sampling": "temperature 1, no EOS stop", "optimizer_steps": work.epochs * work.episodes
                           // work.minibatch},
              "notes": ["scoring: 3 forwards on each side (reference, value, reward); the behaviour log-probs "
                        "come from the sampling pass (ours: PPOConfig.old_logprobs='sampler'; TRL: the logits "
                        "generate returned)",
                        "update: ours takes a policy step and a value step per minibatch (two optimisers); "
                        "TRL one step on pg_loss + vf_coef * vf_loss (one optimiser)"]}
    next_iteration, first_s, jitted = ours(work, mesh, policy, value, reward, prompt_tokens)
    missing = common.missing_peers("torch", "transformers", "trl", "datasets", "accelerate") if peers else []
    with tempfile.TemporaryDirectory() as tmp:
        if peers and not missing:
            tmp = pathlib.Path(tmp)
            dirs = (common.export_lm(policy, cfg, tmp / "policy"), common.export_scalar(value, cfg, tmp / "value"),
                    common.export_scalar(reward, cfg, tmp / "reward"))
            result["max_abs_difference_ours_vs_hf"] = max_output_differences(policy, value, reward, dirs,
                                                                             prompt_tokens)
        compiled, counter = sum(common.jit_cache_size(f) for f in jitted), common.compile_counter()
        with counter.counting():
            counter.count = 0
            if not peers or missing:
                ours_phases = [next_iteration() for _ in range(work.timed_iterations)]
                result["trl_ppo_trainer"] = ({"skipped": "--ours-only"} if not peers else
                                             {"skipped": common.NOT_INSTALLED, "missing": missing})
            else:
                with common.own_heap():
                    result["trl_ppo_trainer"], ours_phases = trl_ppo(work, *dirs, prompt_tokens, next_iteration)
    result["ours"] = {**_median_phases(ours_phases), "first_iteration_s_with_compile": first_s,
                      "iterations_timed": len(ours_phases),
                      "compiles_after_warmup": counter.count + sum(common.jit_cache_size(f) for f in jitted) - compiled}
    ours_row = result["ours"]
    flops = model_flops(work, cfg)
    peaks = common.matmul_peaks(work.peak_n, with_torch=peers and not missing)
    peak = peaks["used"] * 1e12
    result["model_flops"] = {**flops, "matmul_peak_tflops": peaks}
    for row in (ours_row, result["trl_ppo_trainer"]):
        if "skipped" not in row:
            row["fraction_of_matmul_peak"] = flops["iteration"] / row["iteration_s"] / peak
    # the iteration time a speedup target needs, as a fraction of the peak
    result["model_flops"]["fraction_of_peak_for_2x_trl"] = (
        None if "skipped" in result["trl_ppo_trainer"]
        else 2 * flops["iteration"] / result["trl_ppo_trainer"]["iteration_s"] / peak)
    log(f"ppo ours: {ours_row['iteration_s']:.3f} s/iteration (rollout {ours_row['rollout_s']:.3f}, "
        f"scoring {ours_row['scoring_s']:.3f}, update {ours_row['update_s']:.3f})")
    if "skipped" not in result["trl_ppo_trainer"]:
        trl = result["trl_ppo_trainer"]
        result["speedup"] = trl["iteration_s"] / ours_row["iteration_s"]
        log(f"ppo TRL: {trl['iteration_s']:.3f} s/iteration (rollout {trl['rollout_s']:.3f}, scoring "
            f"{trl['scoring_s']:.3f}, update {trl['update_s']:.3f}) -> ours {result['speedup']:.2f}x")
    return result
