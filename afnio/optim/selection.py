"""Choosing among candidate values with a scorer: successive halving and UCB.

Candidate search (:class:`~afnio.optim.CandidateSearch`) and the demonstration search
(:class:`~afnio.optim.DemoOptimizer`) compare candidates — a value per parameter each — by
their mean per-sample score from a :class:`~afnio.optim.scoring.Scorer`. Scoring every
candidate on every sample is what they avoid: a candidate that is clearly worse on the first
samples is dropped, and the samples saved go to the ones still in the race. Every candidate is
scored on the same samples, in the same (seeded) order, so the comparison is fair; the
survivors of a round are scored concurrently.

Example:
    >>> import asyncio
    >>> import afnio
    >>> from afnio.optim import FunctionScorer
    >>> prompt = afnio.Variable("a", role="prefix", requires_grad=True)
    >>> scorer = FunctionScorer(lambda values, idx: float(values[prompt] == "c"), [prompt], 8)
    >>> arms = [Arm({id(prompt): value}, "candidate") for value in "abcd"]
    >>> racing_plan(4, 8)
    [(4, 2), (2, 4), (1, 8)]
    >>> asyncio.run(successive_halving(scorer, arms, {id(prompt): prompt}, list(range(8)),
    ...                                racing_plan(4, 8)))[0]
    2
    >>> sum(arm.samples for arm in arms)   # 4 x 2 + 2 x 2 + 1 x 4, not 4 x 8
    16
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.feedback import gather_all
from afnio.optim.scoring import Scorer

__all__ = ["Arm", "halving_plan", "racing_plan", "ranked", "successive_halving", "ucb"]


@dataclass
class Arm:
    """One candidate: a value per parameter, and the scores it got so far.

    Attributes:
        values: ``id(parameter)`` → the candidate's value for it.
        origin: Where the candidate came from (``"current"``, ``"proposal"``, ...).
        total: The sum of its per-sample scores.
        samples: How many samples it was scored on.
        seen: The position it reached in the sample order.
    """

    values: dict[int, Any]
    origin: str
    total: float = 0.0
    samples: int = 0
    seen: int = 0

    @property
    def mean(self) -> float:
        """The mean per-sample score (``-inf`` before any sample)."""
        return self.total / self.samples if self.samples else -math.inf


async def _pull(
    scorer: Scorer, arm: Arm, params: Mapping[int, Variable], indices: list[int]
) -> None:
    values = {params[key]: value for key, value in arm.values.items()}
    score = await scorer.ascore(values, indices)
    arm.total += score * len(indices)
    arm.samples += len(indices)


def ranked(arms: Sequence[Arm]) -> list[int]:
    """Arm positions, best mean first; ties go to the arm scored on more samples, then to the
    earlier arm (put the current values first)."""
    return sorted(range(len(arms)), key=lambda i: (-arms[i].mean, -arms[i].samples, i))


def halving_plan(num_candidates: int, num_samples: int, budget: int) -> list[tuple[int, int]]:
    """Successive halving under a budget: per round, ``(survivors, samples each has seen by the
    end of the round)``. The number of sample evaluations is
    ``sum(survivors * (seen - previous seen))`` over the rounds, at most ``budget``.

    Example:
        >>> halving_plan(8, 12, 96)      # 8 x 4 + 4 x 8 = 64 sample evaluations
        [(8, 4), (4, 12)]
        >>> halving_plan(5, 12, 10)      # a tight budget: 5 x 1 + 3 x 1 + 2 x 1
        [(5, 1), (3, 2), (2, 3)]
    """
    plan: list[tuple[int, int]] = []
    survivors, seen, left = num_candidates, 0, budget
    rounds = max(1, math.ceil(math.log2(num_candidates))) if num_candidates > 1 else 0
    for number in range(rounds):
        share = left // (survivors * (rounds - number))
        target = min(num_samples, seen + max(1, share))
        if (target - seen) * survivors > left:
            target = seen + left // survivors
        if target <= seen:
            break
        left -= (target - seen) * survivors
        seen = target
        plan.append((survivors, seen))
        survivors = max(1, math.ceil(survivors / 2))
        if seen >= num_samples:
            break
    return plan


def racing_plan(num_candidates: int, num_samples: int) -> list[tuple[int, int]]:
    """Successive halving down to one winner scored on every sample: each round halves the
    survivors and doubles the samples seen, the last round is ``(1, num_samples)``. The first
    round costs about ``num_samples`` evaluations and every later one about half that, so the
    race costs about ``num_samples * (1 + log2(num_candidates) / 2)`` instead of
    ``num_candidates * num_samples``.

    Example:
        >>> racing_plan(4, 66)           # 4 x 17 + 2 x 16 + 1 x 33 = 133, not 4 x 66 = 264
        [(4, 17), (2, 33), (1, 66)]
        >>> racing_plan(4, 2)            # too few samples to halve twice
        [(4, 1), (1, 2)]
    """
    rounds = math.ceil(math.log2(num_candidates)) + 1 if num_candidates > 1 else 1
    plan: list[tuple[int, int]] = []
    survivors = num_candidates
    for number in range(rounds):
        seen = math.ceil(num_samples / 2 ** (rounds - 1 - number))
        if not plan or seen > plan[-1][1]:
            plan.append((survivors, seen))
        survivors = math.ceil(survivors / 2)
    return plan


async def successive_halving(scorer: Scorer, arms: list[Arm], params: Mapping[int, Variable],
                             order: list[int], plan: Sequence[tuple[int, int]]) -> list[int]:
    """Run a halving plan (:func:`halving_plan`, :func:`racing_plan`): each round the best
    ``survivors`` so far are scored on the samples ``order[seen_before:seen]``, concurrently.

    Returns:
        The ranking: the last round's survivors by mean, then the arms dropped in later rounds
        before those dropped earlier.
    """
    alive = list(range(len(arms)))
    dropped: list[list[int]] = []
    for survivors, seen in plan:
        dropped.append(alive[survivors:])
        alive = alive[:survivors]
        await gather_all([
            _pull(scorer, arms[i], params, order[arms[i].seen:seen])
            for i in alive if arms[i].seen < seen
        ])
        for i in alive:
            arms[i].seen = max(arms[i].seen, seen)
        alive = [i for i in ranked(arms) if i in alive]
    return alive + [i for group in reversed(dropped) for i in group]


def _bound(arm: Arm, chunk: int, pulls: int, exploration: float) -> float:
    """UCB: the mean plus ``c * sqrt(2 ln t / n)`` (pulls counted in chunks of samples)."""
    if not arm.samples:
        return math.inf
    rounds = max(1, math.ceil(arm.samples / chunk))
    return arm.mean + exploration * math.sqrt(2 * math.log(max(pulls, 2)) / rounds)


async def ucb(scorer: Scorer, arms: list[Arm], params: Mapping[int, Variable],
              order: list[int], budget: int, width: int, exploration: float) -> list[int]:
    """Upper confidence bound: every arm is scored on a first chunk of samples, then the
    ``width`` arms with the highest bound get the next chunk, until ``budget`` sample
    evaluations are spent or every arm has seen every sample.

    Returns:
        The arms ranked by mean (:func:`ranked`).
    """
    n = len(order)
    chunk = max(1, min(math.ceil(n / 4), budget // len(arms)))
    left = budget

    async def pull_next(positions: list[int]) -> None:
        nonlocal left
        jobs = []
        for i in positions:
            take = min(chunk, n - arms[i].seen, left)
            if take <= 0:
                continue
            start = arms[i].seen
            arms[i].seen += take
            left -= take
            jobs.append(_pull(scorer, arms[i], params, order[start:start + take]))
        await gather_all(jobs)

    await pull_next(list(range(len(arms))))
    while left > 0:
        open_arms = [i for i in range(len(arms)) if arms[i].seen < n]
        if not open_arms:
            break
        pulls = sum(math.ceil(arm.samples / chunk) for arm in arms)
        bounds = {i: _bound(arms[i], chunk, pulls, exploration) for i in open_arms}
        chosen = sorted(open_arms, key=lambda i: (-bounds[i], i))[:width]
        await pull_next(chosen)
    return ranked(arms)
