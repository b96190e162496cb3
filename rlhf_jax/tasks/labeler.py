"""A noisy synthetic labeler: rankings sampled from a Plackett-Luce model on gold scores.

InstructGPT's labelers agreed with each other on about 73% of pairwise comparisons
(72.6 +- 1.5% for training labelers, Ouyang et al. 2022, sec. 5.1). The reward model can
only be as good as its labels, so the synthetic labeler is made just as noisy: a
response's utility is ``gold / temperature``, and a ranking is one Plackett-Luce sample
(sort by utility plus Gumbel noise), which for a single pair is the Bradley-Terry choice
``P(a over b) = sigmoid((gold_a - gold_b) / temperature)``.

``DEFAULT_TEMPERATURE`` was chosen on the comparisons the default pipeline collects (the
SFT and base models' samples, as the RM stage sees them): two independent labelers agree on
0.73 of the pairs with different gold scores (0.723-0.731 over four labeler pairs on 600
prompts of seed 0's comparisons, kept in ``tests/tasks/data``; the report's
``comparisons.inter_labeler_agreement`` measures it on every run; 0.13 gives 0.74, 0.15
0.71). On the synthetic :func:`~rlhf_jax.tasks.internet.sample_responses`, whose responses
differ more from each other, the same temperature gives 0.785 (2000 prompts, seeds 0-3:
0.782-0.787), and each labeler agrees with the gold order on 0.855 of the pairs.
Agreement depends on how far apart the responses are: near-identical responses split
labelers more often.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_jax.tasks.gold import gold_score
from rlhf_jax.tasks.internet import sample_responses
from rlhf_jax.tasks.prompts import generate_prompt

DEFAULT_TEMPERATURE = 0.14
# Scores closer than this are one tie group: equal edit distances must compare equal even
# after float rounding.
_TIE_DECIMALS = 9


def plackett_luce_ranks(scores: Sequence[float], temperature: float,
                        rng: np.random.Generator) -> list[int]:
    """One ranking of items with gold ``scores`` ([K] floats): 0 = best.

    Items with equal scores form a tie group and share a rank; groups are ordered by a
    Plackett-Luce sample with utilities ``score / temperature`` (Gumbel-max: sorting
    ``utility + Gumbel`` noise draws exactly that distribution). Ranks are dense
    (0, 1, 2, ... over groups). ``temperature == 0`` orders groups by score, no noise.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if len(scores) == 0:
        return []
    values, group = np.unique(np.round(np.asarray(scores, np.float64), _TIE_DECIMALS),
                              return_inverse=True)
    keys = values.copy() if temperature == 0 else values / temperature
    if temperature > 0:
        keys = keys + rng.gumbel(size=values.shape)
    order = np.argsort(-keys, kind="stable")  # group ids, best first
    group_rank = np.empty_like(order)
    group_rank[order] = np.arange(len(order))
    return [int(r) for r in group_rank[group.reshape(-1)]]


class NoisyLabeler:
    """Ranks responses to a task prompt like a noisy human labeler.

    ``rank(prompt, responses)`` returns one int per response, 0 = best, equal ints for
    responses of equal gold score (identical responses always tie). Each call draws fresh
    noise from the labeler's own generator, so a labeler is deterministic given its seed
    and the sequence of calls, and two labelers with different seeds disagree like two
    people do.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = float(temperature)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def scores(self, prompt: str, responses: Sequence[str]) -> list[float]:
        """The gold scores the ranking is drawn from (no noise)."""
        return [gold_score(prompt, r) for r in responses]

    def rank(self, prompt: str, responses: Sequence[str]) -> list[int]:
        return plackett_luce_ranks(self.scores(prompt, responses), self.temperature, self._rng)

    def __repr__(self) -> str:
        return f"NoisyLabeler(temperature={self.temperature}, seed={self.seed})"


def gold_ranks(prompt: str, responses: Sequence[str]) -> list[int]:
    """The gold scorer's own ranking (0 = best, equal scores tie): a labeler without noise.
    Raises ``ValueError`` when ``prompt`` is not one of the embedded task's."""
    # a temperature-0 Plackett-Luce draw is the sorted order; its generator is never used
    return plackett_luce_ranks([gold_score(prompt, r) for r in responses], 0.0, np.random.default_rng(0))


def pairwise_agreement(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> tuple[int, int]:
    """``(agreeing, compared)`` over the pairs both rankings order strictly.

    A pair ``(i, j)`` is compared when neither ranking ties it, and agrees when both put
    the same one first.
    """
    a, b = np.asarray(ranks_a), np.asarray(ranks_b)
    if a.shape != b.shape:
        raise ValueError(f"rankings of different lengths: {a.shape} vs {b.shape}")
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    strict = (da != 0) & (db != 0)
    return int(np.sum(strict & (da == db))), int(np.sum(strict))


def _calibration_sets(n_prompts: int, k: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_prompts):
        prompt = generate_prompt(rng)
        out.append((prompt, sample_responses(prompt, k, rng)))
    return out


def labeler_agreement(temperature: float = DEFAULT_TEMPERATURE, n_prompts: int = 2000,
                      k: int = 4, seed: int = 0) -> float:
    """Inter-labeler agreement: the fraction of response pairs (different gold scores) that
    two independent :class:`NoisyLabeler` s at ``temperature`` order the same way.

    Responses are ``k`` per prompt from
    :func:`~rlhf_jax.tasks.internet.sample_responses` on ``n_prompts`` random prompts,
    i.e. of the quality a partially trained policy produces.
    """
    a = NoisyLabeler(temperature, seed=seed + 1)
    b = NoisyLabeler(temperature, seed=seed + 2)
    agree = total = 0
    for prompt, responses in _calibration_sets(n_prompts, k, seed):
        n_agree, n = pairwise_agreement(a.rank(prompt, responses), b.rank(prompt, responses))
        agree, total = agree + n_agree, total + n
    return agree / max(total, 1)


def labeler_gold_accuracy(temperature: float = DEFAULT_TEMPERATURE, n_prompts: int = 2000,
                          k: int = 4, seed: int = 0) -> float:
    """The fraction of pairs (different gold scores) one labeler orders like the gold score,
    on the same responses as :func:`labeler_agreement`: the ceiling for a reward model's
    accuracy on this labeler's held-out comparisons."""
    labeler = NoisyLabeler(temperature, seed=seed + 1)
    agree = total = 0
    for prompt, responses in _calibration_sets(n_prompts, k, seed):
        n_agree, n = pairwise_agreement(labeler.rank(prompt, responses), gold_ranks(prompt, responses))
        agree, total = agree + n_agree, total + n
    return agree / max(total, 1)
