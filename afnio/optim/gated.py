"""Gated steps: keep an optimizer's proposals only when they do not lower the score.

:class:`GatedOptimizer` wraps any optimizer. Its :meth:`~GatedOptimizer.step` scores the
parameters' current values with the closure (see :mod:`afnio.optim.scoring` for the closure
contract), lets the wrapped optimizer step, scores the new values with the same closure, and
keeps them only when the score did not drop. Otherwise the parameter values **and** the wrapped
optimizer's state (momentum, beams, ...) are rolled back exactly to what they were before.

It is a wrapper rather than an option of :class:`~afnio.optim.TGD` so the same gate serves every
optimizer — TGD, candidate search, scored history or your own — with one implementation.

Example:
    >>> import afnio
    >>> from afnio.optim import TGD, GatedOptimizer
    >>> from afnio.testing import ScriptedModel
    >>> prompt = afnio.Parameter("Answer in French.", role="system prompt")
    >>> worse = ScriptedModel(["<IMPROVED_VARIABLE>Answer.</IMPROVED_VARIABLE>"])
    >>> optimizer = GatedOptimizer(TGD([prompt], model_client=worse, momentum=1))
    >>> def closure():                       # re-evaluates the current value; higher is better
    ...     return float("French" in prompt.data)
    >>> prompt.append_grad(afnio.Variable("be shorter"))
    >>> optimizer.step(closure)              # the proposal scores 0.0 < 1.0: rolled back
    1.0
    >>> prompt.data, optimizer.state[prompt]
    ('Answer in French.', {'accepted': 0, 'rejected': 1})
    >>> optimizer.last_step[0]["verdict"]
    'rolled_back'
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.grad_mode import no_grad
from afnio.optim.optimizer import Optimizer
from afnio.optim.scoring import read_score

__all__ = ["GatedOptimizer"]

_COUNTS = ("accepted", "rejected")


def _restore(param: Variable, data: Any) -> None:
    if param.data != data:
        with no_grad():
            param.copy_(copy.deepcopy(data))


class GatedOptimizer(Optimizer):
    """Wraps an optimizer so a step is kept only if it does not lower the score.

    ``step(closure)``:

    1. ``before = closure()`` — the score of the current values (under ``no_grad``);
    2. the wrapped optimizer steps (given the closure too if it needs one);
    3. if no parameter changed, that is all; else ``after = closure()``;
    4. ``after >= before - tolerance``: the new values are kept; else every parameter and the
       wrapped optimizer's whole state are restored exactly as they were before step 2.

    A step is judged as a whole: the closure scores all parameters together, so when it drops,
    every parameter changed in that step is rolled back. If the wrapped step or the second
    closure call raises, everything is rolled back too before the error propagates.

    ``param_groups``, ``state``, ``defaults``, ``state_dict`` and ``load_state_dict`` are the
    wrapped optimizer's (so a gated optimizer resumes from an ungated one's checkpoint and back).
    The gate keeps its counts in that state, per parameter: ``state[p]["accepted"]`` (steps whose
    change to ``p`` was kept) and ``state[p]["rejected"]`` (steps where ``p`` had a proposal that
    was not kept: refused by the wrapped optimizer's checks, or rolled back). :attr:`last_step`
    is the wrapped optimizer's record, each entry with ``score_before`` and ``score_after`` added
    and the verdict ``"rolled_back"`` (with the reason) for a proposal the gate undid; such an
    entry's ``after`` is the proposal that was undone (the parameter holds ``before``).

    Cost per step: the wrapped optimizer's requests, plus one closure evaluation for the score
    before (none when the closure already knows it — the Trainer's does — or when ``evaluate``
    already scored these values) and one after (none when no parameter changed).

    Args:
        optimizer: The optimizer to gate.
        evaluate: A closure of your own that every step uses instead of the one passed to
            :meth:`step` — e.g. one that scores a held-out sample. It is taken to score fixed
            data, so the score it gave the values the parameters still hold is reused as the
            next step's score before (one evaluation per step instead of two). Code, so not
            saved.
        tolerance: How much the score may drop and still be kept (``0.0``: it may not drop).

    Raises:
        TypeError: If ``optimizer`` has no ``step``/``state_dict``, or ``evaluate`` is not
            callable.
        ValueError: If ``tolerance`` is negative.
    """

    needs_closure = True

    def __init__(
        self,
        optimizer: Any,
        *,
        evaluate: Callable[[], Any] | None = None,
        tolerance: float = 0.0,
    ) -> None:
        for method in ("step", "zero_grad", "state_dict", "load_state_dict"):
            if not callable(getattr(optimizer, method, None)):
                raise TypeError(
                    f"GatedOptimizer: the optimizer to gate ({type(optimizer).__name__}) has no "
                    f"{method}()"
                )
        if isinstance(optimizer, GatedOptimizer):
            raise TypeError("GatedOptimizer: the optimizer is already gated")
        if evaluate is not None and not callable(evaluate):
            raise TypeError(
                f"GatedOptimizer: evaluate must be callable, got {type(evaluate).__name__}"
            )
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
            tolerance >= 0
        ):
            raise ValueError(f"GatedOptimizer: tolerance must be a number >= 0, got {tolerance!r}")
        self.optimizer = optimizer
        self.evaluate = evaluate
        self.tolerance = float(tolerance)
        self.last_step: list[dict[str, Any]] = []
        self._known: tuple[list[Any], float] | None = None  # evaluate's last (values, score)

    # ----------------------------------------------------------------- the wrapped optimizer's
    @property
    def uses_gradients(self) -> bool:  # type: ignore[override]
        return getattr(self.optimizer, "uses_gradients", True)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> defaultdict[Variable, dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: defaultdict[Variable, dict[str, Any]]) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self) -> None:
        """Clear the gradients (the wrapped optimizer's ``zero_grad``)."""
        self.optimizer.zero_grad()

    clear_grad = zero_grad

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (the gate's counts are in its ``state``)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], **options: Any) -> None:
        """Load the wrapped optimizer's state dict (see :meth:`state_dict`); ``options`` (such
        as ``load_clients``) go to the wrapped optimizer's ``load_state_dict``."""
        self.optimizer.load_state_dict(state_dict, **options)
        self._known = None

    def _prepare_load_state_dict(self, state_dict: Any, **options: Any) -> Callable[[], None]:
        """The wrapped optimizer's checked load (see :meth:`Optimizer.load_state_dict`), not
        yet applied; applying it also forgets the score ``evaluate`` gave the old values."""
        prepare = getattr(self.optimizer, "_prepare_load_state_dict", None)
        if not callable(prepare):
            return lambda: self.load_state_dict(state_dict, **options)
        update = prepare(state_dict, **options)

        def commit() -> None:
            update()
            self._known = None

        return commit

    def __repr__(self) -> str:
        return f"GatedOptimizer(tolerance={self.tolerance}, optimizer={self.optimizer!r})"

    # ----------------------------------------------------------------- the step
    def _params(self) -> list[Variable]:
        return list(
            dict.fromkeys(p for group in self.optimizer.param_groups for p in group["params"])
        )

    def _score(self, closure: Callable[[], Any]) -> float:
        with no_grad():
            return read_score(closure(), "GatedOptimizer")

    def step(self, closure: Callable[[], Any] | None = None) -> float:
        """Step the wrapped optimizer and keep the result only if the score did not drop.

        Args:
            closure: Re-evaluates the current values and returns the score (ignored when the
                gate was given ``evaluate``).

        Returns:
            The score of the values the parameters hold after the step.

        Raises:
            ValueError: Without a closure (and no ``evaluate``).
            Exception: Whatever the wrapped step or the closure raises (everything rolled back).
        """
        score_fn = self.evaluate if self.evaluate is not None else closure
        if score_fn is None:
            raise ValueError(
                "GatedOptimizer.step: needs a closure that re-evaluates the program and returns "
                "its score (or give the gate evaluate=...); see afnio.optim.scoring"
            )
        params = self._params()
        values = [copy.deepcopy(p.data) for p in params]
        saved_state = {key: copy.deepcopy(value) for key, value in self.optimizer.state.items()}
        if self.evaluate is not None and self._known is not None and self._known[0] == values:
            before = self._known[1]
        else:
            before = self._score(score_fn)

        def roll_back() -> None:
            for param, data in zip(params, values):
                _restore(param, data)
            restored: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
            restored.update(saved_state)
            self.optimizer.state = restored

        try:
            if getattr(self.optimizer, "needs_closure", False):
                self.optimizer.step(closure if closure is not None else score_fn)
            else:
                self.optimizer.step()
            changed = any(p.data != data for p, data in zip(params, values))
            after = self._score(score_fn) if changed else before
        except BaseException:
            roll_back()
            raise
        kept = after >= before - self.tolerance
        records = [dict(record) for record in getattr(self.optimizer, "last_step", None) or []]
        if not kept:
            roll_back()
            reason = (
                f"the score fell from {before:g} to {after:g} on the gate's data, so the step "
                "was rolled back"
            )
            for record in records:
                if record.get("verdict") == "accepted":
                    record["verdict"] = "rolled_back"  # "after" keeps the proposal undone
                    record["reason"] = reason
        id_at = {index: key for key, index in self._param_indices().items()}
        by_id = {id(p): p for p in params}
        for record in records:
            record["score_before"] = before
            record["score_after"] = after
            param = by_id.get(id_at.get(record.get("index"), -1))
            if param is None:
                continue
            counts = self.optimizer.state[param]
            for name in _COUNTS:
                counts.setdefault(name, 0)
            counts["accepted" if record.get("verdict") == "accepted" else "rejected"] += 1
        self.last_step = records
        result = after if kept else before
        if self.evaluate is not None:
            self._known = ([copy.deepcopy(p.data) for p in params], result)
        return result
