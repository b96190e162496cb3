"""Pure, jitted train and eval steps: ``step(state, batch) -> (state, metrics)``.

Each ``make_*`` closes over static things (the model, the optimiser, config) and returns a
function jitted with explicit in/out shardings and the state donated. Maths comes from
``rlhf_jax.losses``; nothing here prints or syncs with the host.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import lm_terms, losses, parameters, sharding
from rlhf_jax.models import lora
from rlhf_jax.types import RankingBatch, TokenBatch, TrainState


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                       rng: jax.Array, params: Any = None) -> tuple[TrainState, Any]:
    """A sharded TrainState around ``params`` (placed, e.g. from :mod:`rlhf_jax.parameters`);
    None draws fresh ones (``parameters.create``) from ``rng``'s first half. The optimiser
    state covers the trainable part only (``models.lora.split_trainable``: the adapters and
    a scalar head when the model has LoRA adapters, else every parameter).

    Returns (state, state_shardings).
    """
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
        params, _ = parameters.create(model, mesh, init_rng)
    tokens = sharding.sample_tokens(mesh)

    def create(given_params):
        # The logical-axis boxes carry the shardings (and the optimiser state's): keep them,
        # swap in the values. Under jit, the unused random init is dead code.
        boxed = model.init(init_rng, tokens)["params"]
        boxed = jax.tree.map(lambda box, value: box.replace_boxed(value), boxed, given_params,
                             is_leaf=lambda x: isinstance(x, nn.Partitioned))
        trainable, _ = lora.split_trainable(boxed)
        return TrainState(step=jnp.zeros((), jnp.int32), params=boxed, opt_state=tx.init(trainable),
                          rng=state_rng)

    return sharding.sharded_create(create, mesh, params)


def split_microbatches(batch: Any, n: int) -> Any:
    """``[B, ...]`` -> ``[n, B/n, ...]`` taking every n-th row, so each device's rows stay local."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable, params: Any, batch: Any, n_micro: int, rng: jax.Array):
    """``value_and_grad(loss_fn)`` accumulated over ``n_micro`` micro-batches (a ``lax.scan``).

    ``loss_fn(params, microbatch, rng) -> (loss, metrics)`` must already be normalised by the
    whole batch's denominator, so summed loss and gradients equal the full-batch ones.
    Metrics (per micro-batch means) are averaged over the micro-batches.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if n_micro == 1:
        return grad_fn(params, batch, rng)
    micro = split_microbatches(batch, n_micro)

    def body(carry, xs):
        index, mb = xs
        (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, index))
        total = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return total, None

    zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (loss, metrics, grads), _ = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]),
                                             (jnp.arange(n_micro), micro))
    return (loss, jax.tree.map(lambda m: m / n_micro, metrics)), grads


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation) -> TrainState:
    """One optimiser step; ``grads`` are those of the trainable part of ``state.params``
    (``models.lora.split_trainable``, see :func:`trainable_value_and_grad`)."""
    trainable, frozen = lora.split_trainable(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    return state.replace(step=state.step + 1, params=lora.merge(optax.apply_updates(trainable, updates), frozen),
                         opt_state=opt_state)


def trainable_value_and_grad(objective: Callable, params: Any, *args) -> tuple[tuple[Any, Any], Any]:
    """``value_and_grad(objective, has_aux=True)`` with respect to the trainable part of
    ``params`` only (``models.lora.split_trainable``): with adapters, no gradient of a
    frozen base weight is ever formed. Returns ((value, aux), trainable grads)."""
    trainable, frozen = lora.split_trainable(params)
    return jax.value_and_grad(lambda t, *a: objective(lora.merge(t, frozen), *a), has_aux=True)(trainable, *args)


def make_train_step(loss_fn: Callable, denominator_fn: Callable, tx: optax.GradientTransformation,
                    mesh: Mesh, state_shardings: Any, batch_cls: Any, grad_accum_steps: int = 1,
                    learning_rate: optax.Schedule | None = None) -> Callable:
    """A jitted ``step(state, batch) -> (state, metrics)`` for any masked-mean loss.

    ``loss_fn(params, batch, rng, denominator) -> (loss, metrics)``; ``denominator_fn(batch)``
    counts what the loss averages over in the whole batch, so the micro-batch gradients
    sum to the full-batch gradient. The per-step RNG is ``fold_in(state.rng, state.step)``.
    ``batch_cls``: the batch's struct class, or a pytree of them (every leaf is split over
    the batch shards by its leading dimension).
    """

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        denominator = denominator_fn(batch)
        trainable, frozen = lora.split_trainable(state.params)  # gradients of the trainable part only
        (loss, metrics), grads = accumulate_gradients(
            lambda t, b, r: loss_fn(lora.merge(t, frozen), b, r, denominator), trainable, batch, grad_accum_steps,
            rng)
        metrics = dict(metrics, **{"train/loss": loss, "optim/grad_norm": optax.tree.norm(grads)})
        if learning_rate is not None:
            metrics["optim/learning_rate"] = learning_rate(state.step)
        return apply_gradients(state, grads, tx), metrics

    return _jit_step(step, mesh, state_shardings, batch_cls)


def make_sft_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                  state_shardings: Any, grad_accum_steps: int = 1,
                  learning_rate: optax.Schedule | None = None, right_padded: bool = False) -> Callable:
    """The SFT (and pretraining) step: masked next-token cross-entropy.

    step(state, batch: TokenBatch ``[B, T]``) -> (state, metrics). ``right_padded``: every
    row is one example then padding (no ``data.packing``), so a GPU may run cuDNN's fused
    attention on row lengths (``models.attention.choose_attention``).
    """

    def loss_fn(params, batch: TokenBatch, rng, denominator):
        terms = lm_terms.next_token_terms(model, params, batch.tokens, batch.positions, batch.segment_ids,
                                          rngs={"dropout": rng}, right_padded=right_padded)
        loss, metrics = losses.sft_loss_from_terms(terms.logprobs, terms.is_top, batch.loss_mask, denominator)
        return loss, losses.named("sft", metrics)

    return make_train_step(loss_fn, lambda b: losses.target_count(b.loss_mask), tx, mesh, state_shardings,
                           TokenBatch, grad_accum_steps, learning_rate)


def _rows(x: jax.Array) -> jax.Array:
    """``[B, K, T]`` -> ``[B*K, T]``: every response its own row."""
    return x.reshape(-1, x.shape[-1])


def ranking_rewards(model: nn.Module, params: Any, batch: RankingBatch, rng: jax.Array | None = None) -> jax.Array:
    """``[B, K] f32``: the reward of every response, read at its last token.

    All K responses of all B prompts go through the network in ONE forward pass of
    ``B*K`` rows, whatever the number of pairs. ``rng`` enables dropout. Every row is one
    response from position 0, then padding (all padding for a missing response), so the
    pass is declared right-padded: a GPU may take cuDNN's fused attention.
    """
    b, k, t = batch.tokens.shape
    rows = _rows
    kwargs = {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
    # The head reads every position and the reward is taken after it: gathering the hidden
    # state first would save a [rows, T, E] f32 copy, but rounds the head's sum differently,
    # and the embedded pipeline's report is kept identical to the digit.
    values, _ = model.apply({"params": params}, rows(batch.tokens), rows(batch.positions),
                            rows(batch.segment_ids), right_padded=True, **kwargs)
    return jnp.take_along_axis(values.reshape(b, k, t), batch.last_index[..., None], axis=-1)[..., 0]


def ranking_logprobs(model: nn.Module, params: Any, batch: RankingBatch, rng: jax.Array | None = None) -> jax.Array:
    """``[B, K] f32``: each response's summed log-prob ``log pi(y | x)`` (its tokens and EOS,
    ``batch.response_mask``) under a language model, all ``B*K`` rows in one forward pass
    (right-padded, as :func:`ranking_rewards`), a chunk of logits at a time
    (``rlhf_jax.lm_terms``). ``rng`` enables dropout."""
    b, k, _ = batch.tokens.shape
    rows = _rows
    terms = lm_terms.next_token_terms(model, params, rows(batch.tokens), rows(batch.positions),
                                      rows(batch.segment_ids), rngs=None if rng is None else {"dropout": rng},
                                      right_padded=True)  # [B*K, T-1]: of token t+1
    return jnp.sum(terms.logprobs * rows(batch.response_mask)[:, 1:], axis=1).reshape(b, k)


PreferenceLoss = Callable[[jax.Array, Any, Any], tuple[jax.Array, dict]]  # (scores, batch, denominator)


def make_preference_step(score_fn: Callable, preference_loss: PreferenceLoss, prefix: str,
                         tx: optax.GradientTransformation, mesh: Mesh, state_shardings: Any, batch_cls: Any,
                         grad_accum_steps: int = 1, learning_rate: optax.Schedule | None = None) -> Callable:
    """The offline preference step the RM and DPO share: ``score_fn(params, batch, rng) ->
    [B, K]`` scores every response of a :class:`RankingBatch` (or a pytree holding one as
    ``ranking_of(batch)``), ``preference_loss(scores, batch, denominator) -> (loss, metrics)``
    turns them into the K-wise pair loss; metrics are named ``prefix/``.

    step(state, batch) -> (state, metrics)
    """

    def loss_fn(params, batch, rng, denominator):
        loss, metrics = preference_loss(score_fn(params, batch, rng), batch, denominator)
        return loss, losses.named(prefix, metrics)

    def denominator(batch):
        ranking = ranking_of(batch)
        return losses.prompts_with_pairs(ranking.ranks, ranking.mask)

    return make_train_step(loss_fn, denominator, tx, mesh, state_shardings, batch_cls, grad_accum_steps,
                           learning_rate)


def ranking_of(batch: Any) -> RankingBatch:
    """The comparisons in a preference batch: the batch, or its first element (DPO's batch
    is ``(RankingBatch, reference log-probs [B, K])``)."""
    return batch if isinstance(batch, RankingBatch) else batch[0]


def make_rm_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, state_shardings: Any,
                 grad_accum_steps: int = 1, learning_rate: optax.Schedule | None = None) -> Callable:
    """The reward-model step: K-wise ranking loss, all pairs of a prompt in one element.

    step(state, batch: RankingBatch ``[B, K, T]``) -> (state, metrics)
    """
    return make_preference_step(
        lambda params, batch, rng: ranking_rewards(model, params, batch, rng),
        lambda rewards, batch, denominator: losses.ranking_loss(rewards, batch.ranks, batch.mask, denominator),
        "rm", tx, mesh, state_shardings, RankingBatch, grad_accum_steps, learning_rate)


def make_dpo_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, state_shardings: Any, *,
                  beta: float, kind: str, label_smoothing: float = 0.0, grad_accum_steps: int = 1,
                  learning_rate: optax.Schedule | None = None) -> Callable:
    """DPO's step (IPO, Plackett-Luce by ``kind``): the preference step over each response's
    summed log-prob under the policy, against the frozen reference's.

    step(state, (batch: RankingBatch ``[B, K, T]``, ref_logps ``[B, K] f32``)) -> (state, metrics)
    """
    return make_preference_step(
        lambda params, batch, rng: ranking_logprobs(model, params, batch[0], rng),
        lambda logps, batch, denominator: dpo_preference_loss(logps, batch, beta, kind, label_smoothing, denominator),
        "dpo", tx, mesh, state_shardings, DPO_BATCH, grad_accum_steps, learning_rate)


DPO_BATCH = (RankingBatch, None)  # DPO's batch: the comparisons and the reference's log-probs [B, K]


def dpo_preference_loss(logps, batch, beta: float, kind: str, label_smoothing: float = 0.0,
                        denominator=None) -> tuple[jax.Array, dict]:
    """:func:`losses.dpo_loss` of the policy's summed log-probs ``logps [B, K]`` on a DPO
    batch ``(RankingBatch, reference log-probs [B, K])``."""
    ranking, ref_logps = batch
    return losses.dpo_loss(logps, ref_logps, ranking.ranks, ranking.mask, beta, kind, label_smoothing, denominator)


def make_dpo_eval_step(model: nn.Module, mesh: Mesh, param_shardings: Any, *, beta: float, kind: str,
                       label_smoothing: float = 0.0) -> Callable:
    """DPO's validation: :func:`make_preference_eval_step` over each response's summed
    log-prob against the reference's. eval(params, (RankingBatch, ref_logps [B, K] f32)) -> sums."""
    return make_preference_eval_step(
        lambda params, batch: ranking_logprobs(model, params, batch[0]),
        lambda logps, batch, _: dpo_preference_loss(logps, batch, beta, kind, label_smoothing),
        mesh, param_shardings, DPO_BATCH)


def make_ranking_logprobs_fn(model: nn.Module, mesh: Mesh, param_shardings: Any) -> Callable:
    """logprobs(params, batch: RankingBatch) -> ``[B, K] f32``: :func:`ranking_logprobs`,
    jitted (DPO's reference)."""
    return sharding.jit_under_mesh(lambda params, batch: ranking_logprobs(model, params, batch), mesh,
                                   in_shardings=(param_shardings, _batch_shardings(mesh, RankingBatch)),
                                   out_shardings=sharding.batch_sharding(mesh, 1))


def make_preference_eval_step(score_fn: Callable, preference_loss: PreferenceLoss, mesh: Mesh,
                              param_shardings: Any, batch_cls: Any) -> Callable:
    """eval(params, batch) -> sums {loss, prompts, correct pairs, pairs}: exact over batches.
    ``score_fn(params, batch)`` and ``preference_loss`` as :func:`make_preference_step`'s."""

    def evaluate(params, batch):
        loss, metrics = preference_loss(score_fn(params, batch), batch, None)
        prompts = metrics["prompts_with_pairs"]
        return {"loss_sum": loss * prompts, "prompts": prompts,
                "correct": metrics["accuracy"] * metrics["pairs"], "pairs": metrics["pairs"]}

    return sharding.jit_under_mesh(evaluate, mesh, in_shardings=(param_shardings, _batch_shardings(mesh, batch_cls)),
                                   out_shardings=sharding.replicated(mesh))


def make_rm_eval_step(model: nn.Module, mesh: Mesh, param_shardings: Any) -> Callable:
    """eval(params, batch) -> sums {loss, prompts, correct pairs, pairs}: exact over batches."""
    return make_preference_eval_step(
        lambda params, batch: ranking_rewards(model, params, batch),
        lambda rewards, batch, denominator: losses.ranking_loss(rewards, batch.ranks, batch.mask),
        mesh, param_shardings, RankingBatch)


def last_token_scores(model: nn.Module, params: Any, tokens, segment_ids, positions,
                      right_padded: bool = False) -> jax.Array:
    """``[B] f32``: a scalar model's output at each row's last real token (tokens, segment ids
    and positions ``[B, T]``; rows may be left- and right-padded). The reward model's score, in
    the RM stage and as PPO's reward. ``right_padded``: the caller declares every row one
    segment from position 0, then padding (a GPU may then take cuDNN's attention)."""
    values, _ = model.apply({"params": params}, tokens, positions, segment_ids, right_padded=right_padded)
    return jnp.take_along_axis(values, losses.last_index(segment_ids > 0)[:, None], axis=1)[:, 0]


def make_score_fn(model: nn.Module, mesh: Mesh, param_shardings: Any, right_padded: bool = False) -> Callable:
    """score(params, tokens, segment_ids, positions) -> ``[B] f32``: :func:`last_token_scores`,
    jitted. ``right_padded``: every row is one segment from position 0, then padding."""

    def score(params, tokens, segment_ids, positions):
        return last_token_scores(model, params, tokens, segment_ids, positions, right_padded)

    batch = sharding.batch_sharding(mesh, 1)
    return sharding.jit_under_mesh(score, mesh, in_shardings=(param_shardings, batch, batch, batch), out_shardings=batch)


def make_lm_eval_step(model: nn.Module, mesh: Mesh, param_shardings: Any, right_padded: bool = False) -> Callable:
    """eval(params, batch) -> (summed NLL, target count): exact means over many batches.
    ``right_padded``: as :func:`make_sft_step`."""

    def evaluate(params, batch: TokenBatch):
        terms = lm_terms.next_token_terms(model, params, batch.tokens, batch.positions, batch.segment_ids,
                                          right_padded=right_padded)
        target_mask = batch.loss_mask[:, 1:].astype(jnp.float32)
        return losses.masked_sum(-terms.logprobs, target_mask), jnp.sum(target_mask)

    return sharding.jit_under_mesh(evaluate, mesh, in_shardings=(param_shardings, _batch_shardings(mesh, TokenBatch)),
                          out_shardings=sharding.replicated(mesh))


def _batch_shardings(mesh: Mesh, batch_cls):
    """Shardings of a batch struct class (or a pytree of classes; ``None`` for a bare array):
    P(('data', 'fsdp')) splits the leading (batch) dim of an array of any rank."""
    if isinstance(batch_cls, (tuple, list)):
        return type(batch_cls)(_batch_shardings(mesh, cls) for cls in batch_cls)
    if batch_cls is None:
        return sharding.batch_sharding(mesh, 1)
    fields = {name: sharding.batch_sharding(mesh, 1) for name in batch_cls.__dataclass_fields__}
    return batch_cls(**fields)


def _jit_step(step: Callable, mesh: Mesh, state_shardings: Any, batch_cls=TokenBatch) -> Callable:
    """A train step jitted with explicit shardings and the state donated."""
    return sharding.jit_under_mesh(step, mesh, in_shardings=(state_shardings, _batch_shardings(mesh, batch_cls)),
                          out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
