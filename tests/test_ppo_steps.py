"""ppo_steps: the behaviour log-probs taken from the sampler equal a recomputed forward pass;
the update's entropy and the evaluator's KL are of the tempered sampling distribution."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parameters, sharding
from rlhf_jax.config import MeshConfig, ModelConfig, OptimConfig, PPOConfig, SamplingConfig
from rlhf_jax.evaluation import PolicyEvaluator, copy_params
from rlhf_jax.models import LanguageModel, ScalarModel
from rlhf_jax.optim import make_optimizer
from rlhf_jax.policy import response_logits, reward_model_score
from rlhf_jax.online_steps import takes_sampler_logprobs
from rlhf_jax.ppo_steps import make_experience_fn, make_ppo_update
from rlhf_jax.sampling import make_sampler
from rlhf_jax.steps import create_train_state
from rlhf_jax.types import PPOState, TokenBatch, TrainState
from tests.helpers import assert_f32_close, f32_rtol, forward_sums

MODEL = ModelConfig(family="llama", vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_len=32)


def _setup(model: ModelConfig = MODEL):
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    policy, scalar = LanguageModel(model), ScalarModel(model)
    policy_params, policy_sh = parameters.create(policy, mesh, jax.random.key(0))
    value_params, value_sh = parameters.create(scalar, mesh, jax.random.key(1))
    value_params["head"]["kernel"] = jax.random.normal(jax.random.key(2), value_params["head"]["kernel"].shape)
    prompts = jax.random.randint(jax.random.key(3), (8, 6), 3, model.vocab_size)
    segments = jnp.ones_like(prompts).at[:2, :2].set(0)
    return mesh, policy, scalar, policy_params, policy_sh, value_params, prompts * segments, segments


def _experience(sampling: SamplingConfig, old_logprobs: str, ref_key=None, model: ModelConfig = MODEL):
    """(sampler log-probs, rollout, metrics) of one batch of 8 prompts (2 left-padded); the
    reference policy is the policy itself, or fresh params from ``ref_key``."""
    mesh, policy, scalar, policy_params, policy_sh, value_params, prompts, segments = _setup(model)
    ref_params = policy_params if ref_key is None else parameters.create(policy, mesh, ref_key)[0]
    cfg = PPOConfig(old_logprobs=old_logprobs)
    sampler = make_sampler(policy, sampling, mesh, policy_sh, eos_id=1, pad_id=0)
    samples = sampler(policy_params, prompts, segments, jax.random.key(4))
    experience = make_experience_fn(policy, scalar, reward_model_score(scalar), cfg, sampling, 0.0, 1.0, mesh)
    rollout, observed_kl, metrics = experience(_state(policy_params, value_params), ref_params, value_params, samples)
    assert float(observed_kl) == float(metrics["ppo/kl_to_ref"])  # what the KL controller is given
    return samples, rollout, metrics


def _state(policy_params, value_params, kl_coef=0.02) -> PPOState:
    """A PPOState of just the params experience reads (no optimiser state)."""
    state = lambda params: TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,  # noqa: E731
                                      rng=jax.random.key(0))
    return PPOState(policy=state(policy_params), value=state(value_params), ema_params=None,
                    kl_coef=jnp.float32(kl_coef))


def test_sampler_logprobs_equal_a_recomputed_forward_pass():
    unfiltered = SamplingConfig(max_new_tokens=8, temperature=0.7)
    assert takes_sampler_logprobs(PPOConfig(), unfiltered)
    assert not takes_sampler_logprobs(PPOConfig(old_logprobs="recompute"), unfiltered)
    assert not takes_sampler_logprobs(PPOConfig(), dataclasses.replace(unfiltered, temperature=0.0))
    # With top-k and top-p too: both are the tempered distribution's log-probs before filtering.
    for sampling in (unfiltered, dataclasses.replace(unfiltered, top_k=5, top_p=0.9)):
        samples, taken, _ = _experience(sampling, "sampler")
        _, recomputed, _ = _experience(sampling, "recompute")
        mask = np.asarray(taken.response_mask)
        assert mask.sum() > 20
        np.testing.assert_array_equal(taken.old_logprobs, samples.logprobs * mask)
        # decoding over the cache's 14 slots against one pass over 14 positions, then a
        # log-softmax over 37 words (tests.helpers.f32_rtol), at the log-probabilities' scale
        sums = [*forward_sums(MODEL, 14), MODEL.vocab_size]
        assert_f32_close(taken.old_logprobs, recomputed.old_logprobs, sums, ops=3)
        # that difference moves each token's KL reward by kl_coef times it, an advantage by up to
        # 8 such tokens, divided by the raw advantages' std when they are whitened
        logprob_bound = f32_rtol(*sums, ops=3) * float(np.max(np.abs(recomputed.old_logprobs)))
        raw = np.asarray(recomputed.returns - recomputed.old_values)[mask > 0]
        np.testing.assert_allclose(taken.advantages, recomputed.advantages, rtol=0,
                                   atol=8 * PPOConfig().kl_coef * logprob_bound / raw.std()
                                   + f32_rtol(8, 64, ops=4) * float(np.max(np.abs(recomputed.advantages))))
        np.testing.assert_array_equal(taken.ref_logprobs, recomputed.ref_logprobs)


def _state_and_update(policy, scalar, policy_params, value_params, cfg: PPOConfig, sampling: SamplingConfig, mesh):
    """A PPOState around copies of the params (beta 0.02) and ``make_ppo_update`` for it."""
    policy_tx, value_tx = make_optimizer(cfg.policy_optim, 10), make_optimizer(cfg.value_optim, 10)
    policy_state, p_sh = create_train_state(policy, policy_tx, mesh, jax.random.key(5), copy_params(policy_params))
    value_state, v_sh = create_train_state(scalar, value_tx, mesh, jax.random.key(5), copy_params(value_params))
    state = PPOState(policy=policy_state, value=value_state, ema_params=copy_params(policy_params),
                     kl_coef=jnp.float32(0.02))
    state_sh = PPOState(policy=p_sh, value=v_sh, ema_params=p_sh.params, kl_coef=sharding.replicated(mesh))
    return state, make_ppo_update(policy, scalar, policy_tx, value_tx, cfg, sampling, mesh, state_sh)


def _entropy_numpy(logits, mask):
    """Mean entropy over the mask of softmax(logits), in float64: ``logits [B, N, V]``."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    per_token = -(p * np.log(p)).sum(-1)
    return float((per_token * mask).sum() / mask.sum())


def test_update_entropy_is_that_of_the_tempered_sampling_distribution():
    """PPO's entropy bonus and ``ppo/entropy`` describe the distribution the episodes were
    sampled from: softmax(logits / T), not the untempered logits (at T = 0.1 they differ)."""
    temperature = 0.1
    sampling = SamplingConfig(max_new_tokens=8, temperature=temperature)
    mesh, policy, scalar, policy_params, policy_sh, value_params, _, _ = _setup()
    _, rollout, metrics = _experience(sampling, "sampler")
    cfg = PPOConfig(minibatch_size=8, prompts=dataclasses.replace(PPOConfig().prompts, batch_size=8),
                    policy_optim=OptimConfig(learning_rate=0.0), value_optim=OptimConfig(learning_rate=0.0))
    state, update = _state_and_update(policy, scalar, policy_params, value_params, cfg, sampling, mesh)
    no_ptx = TokenBatch(*(jnp.zeros((1, 2), jnp.int32) for _ in range(4)))
    # one minibatch of all 8 episodes, so the step's metric is over exactly these tokens
    _, update_metrics = update(state, rollout, no_ptx, metrics["ppo/kl_to_ref"], jax.random.key(6))
    prompt_len = rollout.tokens.shape[1] - rollout.response_mask.shape[1]
    logits = np.asarray(response_logits(policy, policy_params, rollout.tokens, rollout.segment_ids,
                                        rollout.positions, prompt_len))[:, :-1]
    mask = np.asarray(rollout.response_mask)
    tempered, untempered = _entropy_numpy(logits / temperature, mask), _entropy_numpy(logits, mask)
    assert abs(tempered - untempered) > 0.1  # the two differ, so the check below can tell them apart
    # the update's forward pass may add up otherwise (tests.helpers.f32_rtol), moving a logit by
    # at most delta, a tempered one by delta / T; an entropy moves by at most sum_i p_i |z_i - mean z|
    # times that (its gradient in the tempered logits z), plus its own sums (37 words, the tokens)
    delta = f32_rtol(*forward_sums(MODEL, rollout.tokens.shape[1]), ops=2) * float(np.abs(logits).max()) / temperature
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    spread = (p * np.abs(z - (p * z).sum(-1, keepdims=True))).sum(-1)[mask > 0].max()
    np.testing.assert_allclose(float(update_metrics["ppo/entropy"]), tempered, rtol=0,
                               atol=spread * delta + f32_rtol(MODEL.vocab_size, int(mask.sum()), ops=4) * tempered)


class _Batches:
    def __init__(self, batch):
        self.batch = batch

    def eval_batches(self):
        yield self.batch


class _Decoder:
    eos_id, pad_id = 1, 0

    def decode(self, ids):
        return " ".join(map(str, ids))

    decode_prompt = decode  # no chat template: a prompt is its decoded text


def test_evaluator_kl_is_the_training_estimate_on_sampled_responses():
    """The held-out KL is what training reports: on the same sampled responses, the summed
    per-token estimate at the sampling temperature equals experience's ``ppo/kl_to_ref``
    (k1 and k3); greedy responses get no KL at all (their log-ratio estimates nothing)."""
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.7)
    mesh, policy, scalar, policy_params, policy_sh, value_params, prompts, segments = _setup()
    ref_params = parameters.create(policy, mesh, jax.random.key(9))[0]
    batch = TokenBatch(tokens=prompts, loss_mask=jnp.zeros_like(prompts), segment_ids=segments,
                       positions=jnp.zeros_like(prompts))
    for estimator in ("k1", "k3"):
        evaluator = PolicyEvaluator(policy, reward_model_score(scalar), mesh, policy_sh, _Decoder(), sampling,
                                    seed=0, kl_estimator=estimator)
        generations = evaluator.generate(policy_params, ref_params, value_params, _Batches(batch))
        # the evaluator's draw 0 samples with PRNGKey(seed + batch index)
        samples = evaluator.sampler(policy_params, prompts, segments, jax.random.PRNGKey(0))
        cfg = PPOConfig(kl_estimator=estimator, old_logprobs="recompute")
        experience = make_experience_fn(policy, scalar, reward_model_score(scalar), cfg, sampling, 0.0, 1.0, mesh)
        _, _, metrics = experience(_state(policy_params, value_params), ref_params, value_params, samples)
        assert len(generations.kl) == 8 and abs(float(metrics["ppo/kl_to_ref"])) > 0.05
        # both recompute the policy's and the reference's log-probs in passes of their own
        # (tests.helpers.f32_rtol); a sequence's KL sums up to 8 tokens' log-ratios r, each off by
        # both bounds, k3's by |1 - e^-r| times that
        full, segs, pos = samples.full_sequences()
        logp, ref = (np.asarray(jax.nn.log_softmax(response_logits(policy, p, full, segs, pos, prompts.shape[1])
                                                   [:, :-1] / sampling.temperature, -1))
                     for p in (policy_params, ref_params))
        bound = f32_rtol(*forward_sums(MODEL, full.shape[1]), MODEL.vocab_size, ops=3) * max(
            np.abs(logp).max(), np.abs(ref).max())
        slope = 1.0 if estimator == "k1" else float(np.exp(np.abs(logp - ref).max()))
        np.testing.assert_allclose(generations.kl.mean(), float(metrics["ppo/kl_to_ref"]), rtol=0,
                                   atol=8 * 2 * bound * slope + f32_rtol(8, 8) * float(np.abs(generations.kl).max()))
    assert (generations.kl >= 0).all()  # k3 is never negative
    greedy = PolicyEvaluator(policy, reward_model_score(scalar), mesh, policy_sh, _Decoder(),
                             dataclasses.replace(sampling, temperature=0.0))
    assert greedy.generate(policy_params, ref_params, value_params, _Batches(batch)).kl is None


def test_ptx_rows_take_the_lengths_path_on_a_gpu_and_rollouts_do_not(monkeypatch):
    """PPO-ptx's pretraining rows (unpacked: one piece from position 0, then padding) are
    declared right-padded, so on a (pretended) GPU in bfloat16 their forward pass takes the
    lengths path (cuDNN's; run by XLA here), and the update equals the mask path's. The
    rollouts (a left-padded prompt, then the response) still take the mask."""
    from rlhf_jax.models import attention

    model = dataclasses.replace(MODEL, compute_dtype="bfloat16")
    t, rows = 12, 4
    lengths = np.array([12, 9, 5, 0])  # the last row is padding
    segments = (np.arange(t) < lengths[:, None]).astype(np.int32)
    ptx = TokenBatch(tokens=jnp.asarray(np.random.default_rng(0).integers(3, 37, (rows, t)) * segments),
                     loss_mask=jnp.asarray(segments, jnp.float32).at[:, 0].set(0.0),
                     segment_ids=jnp.asarray(segments), positions=jnp.asarray(np.where(segments, np.arange(t), 0)))
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    cfg = PPOConfig(minibatch_size=8, ptx_coef=2.0,
                    prompts=dataclasses.replace(PPOConfig().prompts, batch_size=8),
                    pretrain=dataclasses.replace(PPOConfig().pretrain, batch_size=rows))
    calls, lengths_attention = [], attention.length_attention

    def xla_lengths(q, k, v, lengths, implementation="cudnn"):
        calls.append(q.shape[:2])
        return lengths_attention(q, k, v, lengths, "xla")

    def one_update(model_cfg):
        mesh, policy, scalar, policy_params, _, value_params, _, _ = _setup(model_cfg)
        _, rollout, metrics = _experience(sampling, "sampler", model=model_cfg)
        state, update = _state_and_update(policy, scalar, policy_params, value_params, cfg, sampling, mesh)
        return update(state, rollout, ptx, metrics["ppo/kl_to_ref"], jax.random.key(6))[1]

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    by_mask = one_update(dataclasses.replace(model, attention_impl="xla"))
    assert calls == []
    monkeypatch.setattr(attention, "length_attention", xla_lengths)
    by_lengths = one_update(model)
    assert calls and set(calls) == {(rows, t)}  # the ptx rows, in every layer; no rollout
    assert np.isfinite(float(by_lengths["ptx/loss"]))
    # bfloat16 compute: a sum added up otherwise can move each rounding of a result to bfloat16
    # (2**-8) by a step, 9 a layer and the head's, at the scale of the loss's terms (the policy
    # loss's are whitened advantages, about 1; the others are their own magnitude)
    steps = (9 * model.n_layers + 1) * 2.0 ** -8
    for key in ("ptx/loss", "ppo/policy_loss", "ppo/entropy"):
        scale = 1.0 if key == "ppo/policy_loss" else abs(float(by_mask[key]))
        np.testing.assert_allclose(float(by_lengths[key]), float(by_mask[key]), rtol=0, atol=steps * scale,
                                   err_msg=key)
