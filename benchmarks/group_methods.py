"""One GRPO and one RLOO iteration (rollout + scoring + update): ours against TRL's GRPOTrainer
and RLOOTrainer, split by phase, beside the PPO row (``benchmarks/ppo.py``).

The workload is one iteration of the embedded default's GRPO / RLOO stages: 64 prompts x 4
responses = 256 episodes (PPO's 256) of 22 prompt + 12 response tokens, 4 minibatches of 64,
1 epoch. Same models on both sides: the embedded default (llama 2 layers, d128, GQA) as
policy and reference, a scalar model of that architecture (random head) as reward model,
exported to HF for TRL. Same prompts; sampling at temperature 1 for exactly the response
length (no EOS: ours an EOS id that never occurs, TRL ``min_new_tokens`` = the length);
AdamW (b2 0.95, no clipping, constant learning rate). GRPO: group-std advantages, clipped
ratio (0.2), k3 KL in the loss with beta 0.04, the GRPO paper's per-sequence token mean (TRL
``loss_type="grpo"``). RLOO: k1 KL summed per sequence as a reward penalty (beta 0.05), the
leave-one-out baseline, the clipped sequence ratio. Both take the behaviour log-probs from
the sampling pass on our side; TRL recomputes them only when it needs to (one pass per
generation, ``num_iterations`` 1: its old log-probs are the detached current ones).

Phases. Ours: the stage's three jitted calls (sampler, experience, update), each waited on.
TRL: its ``train()`` loop instrumented from outside: rollout = its ``_generate`` call;
scoring = the rest of ``_generate_and_score_completions`` (reference forward, reward model,
advantages); update = from there to the ``on_step_end`` of the iteration's last optimiser
step (4 of them). Ours and TRL take turns iteration by iteration (TRL's callback runs one of
ours at each iteration's end), so both see the same machine load.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.ppo import EOS, NEVER, PAD, model_config, models, timed_iteration, trl_phase_rows, warmed_up
from rlhf_jax import sharding
from rlhf_jax.config import GRPOConfig, OptimConfig, RLOOConfig, SamplingConfig
from rlhf_jax.default_config import default_config
from rlhf_jax.evaluation import copy_params
from rlhf_jax.models import LanguageModel, ScalarModel
from rlhf_jax.online_steps import make_group_experience, make_group_update
from rlhf_jax.optim import make_optimizer
from rlhf_jax.policy import reward_model_score
from rlhf_jax.sampling import make_sampler
from rlhf_jax.stages.grpo import GRPO
from rlhf_jax.stages.rloo import RLOO
from rlhf_jax.steps import create_train_state
from rlhf_jax.types import PolicyState

_DEFAULT = default_config()


@dataclasses.dataclass(frozen=True)
class GroupWorkload:
    """One iteration of the embedded default's GRPO (and RLOO) stage."""

    prompts: int = _DEFAULT.grpo.prompts.batch_size
    group: int = _DEFAULT.grpo.group_size
    prompt_len: int = _DEFAULT.grpo.prompts.max_len
    response_len: int = _DEFAULT.generation.sampling.max_new_tokens
    minibatch: int = _DEFAULT.grpo.minibatch_size
    learning_rate: float = _DEFAULT.grpo.policy_optim.learning_rate
    grpo_beta: float = 0.04
    rloo_beta: float = 0.05
    timed_iterations: int = 3

    @property
    def episodes(self) -> int:
        return self.prompts * self.group


def method_config(work: GroupWorkload, name: str):
    optim = OptimConfig(learning_rate=work.learning_rate, b2=0.95, final_lr_fraction=1.0, grad_clip=0.0)
    shared = dict(policy_optim=optim, minibatch_size=work.minibatch, epochs=1, group_size=work.group, ema_decay=0.0,
                  missing_eos_penalty=0.0, prompts=dataclasses.replace(_DEFAULT.grpo.prompts, batch_size=work.prompts))
    if name == "grpo":
        return GRPO(GRPOConfig(**shared, kl_coef=work.grpo_beta, clip_low=0.2, clip_high=0.2,
                               aggregation="seq_mean_token_mean"))
    return RLOO(RLOOConfig(**shared, kl_coef=work.rloo_beta, clip=0.2))


def build_ours(work: GroupWorkload, name: str, mesh, policy_params, reward_params, prompt_tokens):
    """(state, ``iteration(state, i) -> (state, phase seconds)``, the jitted steps): the
    stage's three jitted calls, each waited on."""
    cfg = model_config()
    method = method_config(work, name)
    policy, scalar = LanguageModel(cfg), ScalarModel(cfg)
    sampling = SamplingConfig(max_new_tokens=work.response_len, temperature=1.0)
    tx = make_optimizer(method.cfg.policy_optim, 1000)
    rng = jax.random.PRNGKey(0)
    policy_state, policy_sh = create_train_state(policy, tx, mesh, rng, copy_params(policy_params))
    replicated = sharding.replicated(mesh)
    kl_coef = jax.device_put(jnp.float32(method.cfg.kl_coef), replicated)
    state = PolicyState(policy=policy_state, ema_params=copy_params(policy_params), kl_coef=kl_coef)
    state_sh = PolicyState(policy=policy_sh, ema_params=policy_sh.params, kl_coef=replicated)
    ref_params = copy_params(policy_params)
    sampler = make_sampler(policy, sampling, mesh, policy_sh.params, NEVER, PAD)
    experience = make_group_experience(method, policy, reward_model_score(scalar), method.cfg, sampling, 0.0, 1.0, mesh)
    update = make_group_update(method, policy, tx, method.cfg, sampling, mesh, state_sh)
    iteration = timed_iteration(sampler, experience, update, np.repeat(prompt_tokens, work.group, axis=0), mesh,
                                ref_params, reward_params, None, rng)
    return state, iteration, (sampler.jitted, experience.jitted, update.jitted)


def ours(work: GroupWorkload, name: str, mesh, policy_params, reward_params, prompt_tokens):
    """Our iteration, compiled by a first one: (``next() -> phase seconds``, that first
    iteration's seconds, the jitted steps)."""
    state, iteration, jitted = build_ours(work, name, mesh, policy_params, reward_params, prompt_tokens)
    return (*warmed_up(state, iteration), jitted)


def _median(rows: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in rows])) for key in rows[0]}


def trl_trainer(work: GroupWorkload, name: str, policy_dir: pathlib.Path, reward_dir: pathlib.Path,
                prompt_tokens: np.ndarray, alongside) -> tuple[dict, list[dict]]:
    """TRL's GRPOTrainer or RLOOTrainer, taking turns with ``alongside()`` (our iteration)
    at each of its iterations' ends. Returns (TRL's phases, ours alongside its timed ones)."""
    torch, device = common.setup_torch()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    if name == "grpo":
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as Trainer
        method_args = dict(beta=work.grpo_beta, loss_type="grpo", scale_rewards="group")
    else:
        from trl import RLOOConfig as TRLConfig
        from trl import RLOOTrainer as Trainer
        method_args = dict(beta=work.rloo_beta, normalize_advantages=False)
    steps_per_iteration = work.episodes // work.minibatch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks: list[tuple[str, float]] = []
    ours_phases: list[dict] = []
    original_generate, original_score = Trainer._generate, Trainer._generate_and_score_completions

    def timed_generate(self, *args, **kwargs):
        sync()
        marks.append(("generate_start", time.perf_counter()))
        out = original_generate(self, *args, **kwargs)
        sync()
        marks.append(("generate_end", time.perf_counter()))
        return out

    def timed_score(self, *args, **kwargs):
        out = original_score(self, *args, **kwargs)
        sync()
        marks.append(("scored", time.perf_counter()))
        return out

    class Turns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(("resumed", time.perf_counter()))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0:
                sync()
                marks.append(("iteration_end", time.perf_counter()))
                ours_phases.append(alongside())
                marks.append(("resumed", time.perf_counter()))

    iterations = 1 + work.timed_iterations
    text = [" ".join(f"t{t}" for t in row) for row in prompt_tokens]
    dataset = Dataset.from_dict({"prompt": text})
    tokenizer = common.word_tokenizer(model_config().vocab_size, PAD, EOS)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32)
    Trainer._generate, Trainer._generate_and_score_completions = timed_generate, timed_score
    try:
        with tempfile.TemporaryDirectory() as out:
            args = TRLConfig(
                output_dir=out, per_device_train_batch_size=work.minibatch, gradient_accumulation_steps=1,
                steps_per_generation=steps_per_iteration, num_generations=work.group, num_iterations=1,
                max_completion_length=work.response_len, temperature=1.0, top_p=1.0, top_k=0,
                generation_kwargs={"min_new_tokens": work.response_len}, epsilon=0.2,
                max_steps=iterations * steps_per_iteration, learning_rate=work.learning_rate, adam_beta2=0.95,
                lr_scheduler_type="constant", max_grad_norm=0.0, bf16=False, fp16=False,
                use_cpu=device.type == "cpu", report_to="none", save_strategy="no", logging_steps=10_000,
                disable_tqdm=True, seed=0, shuffle_dataset=False, **method_args)
            trainer = Trainer(model=policy, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, reward_processing_classes=tokenizer, callbacks=[Turns()])
            trainer.train()
    finally:
        Trainer._generate, Trainer._generate_and_score_completions = original_generate, original_score
    torch.set_num_threads(common.peer_threads())
    rows = trl_phase_rows(marks, "scored", "iteration_end", iterations)
    return ({**_median(rows[1:]), "first_iteration_s": rows[0]["iteration_s"], "iterations_timed": len(rows) - 1,
             "timing": "median iteration after the first, taking turns with ours iteration by iteration"},
            ours_phases[1:])


def run(work: GroupWorkload = GroupWorkload(), peers: bool = True, log=print) -> dict:
    mesh = common.single_device_mesh()
    cfg = model_config()
    policy, _, reward = models(mesh)
    prompt_tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, (work.prompts, work.prompt_len)).astype(
        np.int32)
    missing = common.missing_peers("torch", "transformers", "trl", "datasets", "accelerate") if peers else []
    result = {"workload": {**dataclasses.asdict(work), "episodes": work.episodes,
                           "model": "embedded default (llama 2L d128 GQA 4/2 heads)",
                           "sampling": "temperature 1, no EOS stop",
                           "optimizer_steps": work.episodes // work.minibatch}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = None
        if peers and not missing:
            tmp = pathlib.Path(tmp)
            dirs = (common.export_lm(policy, cfg, tmp / "policy"), common.export_scalar(reward, cfg, tmp / "reward"))
        for name, peer in (("grpo", "trl_grpo_trainer"), ("rloo", "trl_rloo_trainer")):
            next_iteration, first_s, jitted = ours(work, name, mesh, policy, reward, prompt_tokens)
            compiled, counter = sum(common.jit_cache_size(f) for f in jitted), common.compile_counter()
            row = {}
            with counter.counting():
                counter.count = 0
                if dirs is None:
                    phases = [next_iteration() for _ in range(work.timed_iterations)]
                    row[peer] = ({"skipped": "--ours-only"} if not peers else
                                 {"skipped": common.NOT_INSTALLED, "missing": missing})
                else:
                    with common.own_heap():
                        row[peer], phases = trl_trainer(work, name, *dirs, prompt_tokens, next_iteration)
            row["ours"] = {**_median(phases), "first_iteration_s_with_compile": first_s,
                           "iterations_timed": len(phases),
                           "compiles_after_warmup": counter.count + sum(common.jit_cache_size(f) for f in jitted)
                           - compiled}
            if "skipped" not in row[peer]:
                row["speedup"] = row[peer]["iteration_s"] / row["ours"]["iteration_s"]
            result[name] = row
            log(f"{name} ours: {row['ours']['iteration_s']:.3f} s/iteration"
                + (f"; TRL {row[peer]['iteration_s']:.3f} s -> ours {row['speedup']:.2f}x" if "speedup" in row else ""))
    return result
