"""ppo_steps: the behaviour log-probs taken from the sampler equal a recomputed forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.config import MeshConfig, ModelConfig, PPOConfig, SamplingConfig
from rlhf_jax.models import LanguageModel, ScalarModel
from rlhf_jax.ppo_steps import make_experience_fn, reward_model_score, takes_sampler_logprobs
from rlhf_jax.sampling import make_sampler

MODEL = ModelConfig(family="llama", vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_len=32)


def _experience(sampling: SamplingConfig, old_logprobs: str):
    """(sampler log-probs, rollout) of one batch of 8 prompts (2 left-padded)."""
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    policy, scalar = LanguageModel(MODEL), ScalarModel(MODEL)
    policy_params, policy_sh = sharding.init_params(policy, mesh, jax.random.key(0))
    value_params, _ = sharding.init_params(scalar, mesh, jax.random.key(1))
    value_params["head"]["kernel"] = jax.random.normal(jax.random.key(2), value_params["head"]["kernel"].shape)
    cfg = PPOConfig(sampling=sampling, old_logprobs=old_logprobs)
    prompts = jax.random.randint(jax.random.key(3), (8, 6), 3, MODEL.vocab_size)
    segments = jnp.ones_like(prompts).at[:2, :2].set(0)
    prompts = prompts * segments
    sampler = make_sampler(policy, sampling, mesh, policy_sh, eos_id=1, pad_id=0)
    samples = sampler(policy_params, prompts, segments, jax.random.key(4))
    experience = make_experience_fn(policy, scalar, reward_model_score(scalar), cfg, 0.0, 1.0, mesh)
    rollout, _ = experience(policy_params, policy_params, value_params, value_params, samples, jnp.float32(0.02))
    return samples, rollout


def test_sampler_logprobs_equal_a_recomputed_forward_pass():
    unfiltered = SamplingConfig(max_new_tokens=8, temperature=0.7)
    assert takes_sampler_logprobs(PPOConfig(sampling=unfiltered))
    assert not takes_sampler_logprobs(PPOConfig(sampling=unfiltered, old_logprobs="recompute"))
    assert not takes_sampler_logprobs(PPOConfig(sampling=dataclasses.replace(unfiltered, temperature=0.0)))
    # With top-k and top-p too: both are the tempered distribution's log-probs before filtering.
    for sampling in (unfiltered, dataclasses.replace(unfiltered, top_k=5, top_p=0.9)):
        samples, taken = _experience(sampling, "sampler")
        _, recomputed = _experience(sampling, "recompute")
        mask = np.asarray(taken.response_mask)
        assert mask.sum() > 20
        np.testing.assert_array_equal(taken.old_logprobs, samples.logprobs * mask)
        np.testing.assert_allclose(taken.old_logprobs, recomputed.old_logprobs, atol=2e-5)
        np.testing.assert_allclose(taken.advantages, recomputed.advantages, atol=2e-4)
        np.testing.assert_array_equal(taken.ref_logprobs, recomputed.ref_logprobs)
