"""Held-out evaluation of a policy: its responses, their reward-model score, its KL to a
reference policy, and its pretraining loss. Shared by the PPO stage and the pipeline."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import losses
from rlhf_jax.config import SamplingConfig
from rlhf_jax.data import to_global
from rlhf_jax.data.chat import Prompt
from rlhf_jax.policy import RewardFn, response_terms
from rlhf_jax.sampling import Samples, make_sampler
from rlhf_jax.sharding import jit_under_mesh
from rlhf_jax.steps import make_lm_eval_step


@dataclasses.dataclass
class Generations:
    """Decoded held-out responses (host side) in prompt-file order, draw after draw when
    there are several per prompt (row ``d * n_prompts + i`` is draw ``d`` of prompt ``i``)."""

    # each row's prompt as the policy was given it: a conversation the tokenizer's chat template
    # rendered (:meth:`~rlhf_jax.data.HFTokenizer.decode_prompt`), else the decoded text
    prompts: list[Prompt]
    responses: list[str]  # decoded without special tokens: the stop token (EOS, end of turn) is not in the text
    scores: np.ndarray  # [N] score of each response (reward model, normalised as exported)
    # [N] summed per-token KL(policy || reference) estimate of each sampled response, at the
    # sampling temperature; None for greedy responses, whose log-ratio is no KL estimate
    kl: np.ndarray | None
    lengths: np.ndarray  # [N] response tokens, EOS included
    ended: np.ndarray  # [N] bool: the response emitted EOS

    @staticmethod
    def concat(parts: Sequence["Generations"]) -> "Generations":
        kls = [p.kl for p in parts]
        return Generations(prompts=[x for p in parts for x in p.prompts],
                           responses=[x for p in parts for x in p.responses],
                           scores=np.concatenate([p.scores for p in parts]),
                           kl=None if any(k is None for k in kls) else np.concatenate(kls),
                           lengths=np.concatenate([p.lengths for p in parts]),
                           ended=np.concatenate([p.ended for p in parts]))


class PolicyEvaluator:
    """Compiled once per (policy, reward model, mesh, sampling settings); call with any
    params of that shape. With a sampling temperature > 0 each response also gets the
    estimate ``kl_estimator`` (:func:`~rlhf_jax.losses.kl_estimate`) of KL(policy ||
    reference) summed over its tokens, from log-probs at that temperature: the quantity
    PPO's ``ppo/kl_to_ref`` reports on training episodes."""

    def __init__(self, policy, reward_fn: RewardFn, mesh, policy_shardings, tokenizer,
                 sampling: SamplingConfig, seed: int = 0, kl_estimator: str = "k1"):
        self.mesh, self.tokenizer, self.seed, self.sampling = mesh, tokenizer, seed, sampling
        self.kl_estimator = kl_estimator
        self.sampler = make_sampler(policy, sampling, mesh, policy_shardings, tokenizer.eos_id, tokenizer.pad_id)
        self.score = jit_under_mesh(reward_fn, mesh)
        self.lm_eval = make_lm_eval_step(policy, mesh, policy_shardings)
        temperature = sampling.temperature

        def kl_to_reference(params, ref_params, samples: Samples):
            tokens, segments, positions = samples.full_sequences()
            p = samples.prompt_tokens.shape[1]
            mask = samples.mask.astype(jnp.float32)
            logp = response_terms(policy, params, tokens, segments, positions, p, temperature).logprobs
            ref = response_terms(policy, ref_params, tokens, segments, positions, p, temperature).logprobs
            return jnp.sum(losses.kl_estimate(logp, ref, kl_estimator) * mask, axis=1)

        self.kl = jit_under_mesh(kl_to_reference, mesh) if temperature > 0 else None

    def generate(self, params, ref_params, reward_params, prompt_batches, draw: int = 0) -> Generations:
        """Responses to every prompt of ``prompt_batches`` (its ``eval_batches``), scored.
        ``draw`` numbers independent draws of the same prompts (when sampling)."""
        out = {k: [] for k in ("prompt", "response", "score", "kl", "length", "ended")}
        for i, local in enumerate(prompt_batches.eval_batches()):
            batch = to_global(local, self.mesh)
            # draw 0 keeps the keys earlier runs used, so their reports stay reproducible
            batch_key = (jax.random.PRNGKey(self.seed + i) if draw == 0
                         else jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), draw), i))
            samples = self.sampler(params, batch.tokens, batch.segment_ids, batch_key)
            scores = self.score(reward_params, samples)
            kl = self.kl(params, ref_params, samples) if self.kl is not None else jnp.zeros(scores.shape)
            host = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                                (samples, scores, kl, batch.segment_ids))
            samples_h, scores_h, kl_h, prompt_segments = host
            real = prompt_segments.any(axis=1)  # padding rows of the last batch have no prompt
            for row in np.flatnonzero(real):
                out["prompt"].append(self.tokenizer.decode_prompt(samples_h.prompt_tokens[row][prompt_segments[row] > 0]))
                response = samples_h.tokens[row][samples_h.mask[row]]
                out["response"].append(self.tokenizer.decode(response))
                out["score"].append(scores_h[row])
                out["kl"].append(kl_h[row])
                out["length"].append(int(samples_h.mask[row].sum()))
                out["ended"].append(bool(samples_h.ended[row]))
        return Generations(prompts=out["prompt"], responses=out["response"], scores=np.array(out["score"]),
                           kl=np.array(out["kl"]) if self.kl is not None else None,
                           lengths=np.array(out["length"]), ended=np.array(out["ended"], bool))

    def generate_draws(self, params, ref_params, reward_params, prompt_batches, n: int) -> Generations:
        """``n`` independent draws (1..n) for every prompt, concatenated draw after draw."""
        return Generations.concat([self.generate(params, ref_params, reward_params, prompt_batches, draw=d)
                                   for d in range(1, n + 1)])

    def pretrain_loss(self, params, text_batches) -> float:
        """Mean next-token loss on every pretraining validation text (the alignment tax)."""
        return mean_lm_loss(self.lm_eval, params, text_batches, self.mesh)


def mean_lm_loss(eval_fn: Callable, params: Any, batches: Any, mesh) -> float:
    """Mean next-token loss over every example of ``batches`` (``eval_batches()``), with
    ``eval_fn`` a :func:`rlhf_jax.steps.make_lm_eval_step`: exact (sums, then one divide),
    summed on the device and read once."""
    total, count = jnp.zeros(()), jnp.zeros(())
    for local in batches.eval_batches():
        nll, n = eval_fn(params, to_global(local, mesh))
        total, count = total + nll, count + n
    return float(total / jnp.maximum(count, 1.0))


def sample_draws(evaluator: PolicyEvaluator, params, reward_params, prompt_batches, n: int,
                 progress: Callable[[], None] | None = None) -> list[Generations]:
    """Draws 1..n of ``params``' responses to every prompt (each scored), one per call."""
    draws = []
    for draw in range(1, n + 1):
        draws.append(evaluator.generate(params, params, reward_params, prompt_batches, draw=draw))
        if progress is not None:
            progress()
    return draws


def best_of_n_picks(draws: Sequence[Generations], n: int) -> list[tuple[Generations, np.ndarray]]:
    """Best-of-n from draws of the same prompts: the draws in groups of ``n`` (a last
    incomplete group is left out), and for each group the response with the highest score
    per prompt, with the index of its draw in the group ``[P]``."""
    picks = []
    for start in range(0, len(draws) - n + 1, n):
        group = draws[start:start + n]
        chosen = np.asarray(losses.best_of_n_pick(jnp.asarray(np.stack([g.scores for g in group]))))
        rows = range(len(chosen))
        kl = None if any(g.kl is None for g in group) else np.array([group[c].kl[i] for i, c in zip(rows, chosen)])
        picks.append((Generations(
            prompts=group[0].prompts, responses=[group[c].responses[i] for i, c in zip(rows, chosen)],
            scores=np.array([group[c].scores[i] for i, c in zip(rows, chosen)]), kl=kl,
            lengths=np.array([group[c].lengths[i] for i, c in zip(rows, chosen)]),
            ended=np.array([group[c].ended[i] for i, c in zip(rows, chosen)], bool)), chosen))
    return picks


def summarize(generations: Generations, prefix: str, extra: Callable[[Generations], dict] | None = None) -> dict[str, float]:
    """Scalar metrics of a set of generations, keys under ``prefix/`` (``kl_to_ref`` only
    for sampled ones)."""
    metrics = {f"{prefix}/score": float(generations.scores.mean()),
               f"{prefix}/response_length": float(generations.lengths.mean()),
               f"{prefix}/eos_rate": float(generations.ended.mean())}
    if generations.kl is not None:
        metrics[f"{prefix}/kl_to_ref"] = float(generations.kl.mean())
    if extra is not None:
        metrics.update({f"{prefix}/{k}": float(v) for k, v in extra(generations).items()})
    return metrics


def copy_params(params: Any) -> Any:
    """A fresh copy of ``params`` (so a donated train state never aliases a frozen copy)."""
    return jax.tree.map(jnp.copy, params)
