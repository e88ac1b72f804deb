"""What one training step did, as the run history records it.

Around each training step the Trainer asks a :class:`StepRecorder` to

- snapshot every optimized parameter's value and its feedback (the texts in ``grad``) before
  ``optimizer.step()``, and its value after; the optimizer's verdict comes from its
  ``last_step`` list when it has a fresh one (see below), else it is derived: a changed value
  is ``"accepted"``, an unchanged one ``"unchanged"``;
- measure the usage of each model client it can see (the agent's ``named_models()``, clients in
  optimizer options, the backward client), labelled ``provider/model``; what the run-wide usage
  grew by beyond those is labelled ``other``.

**The verdict contract.** After each ``step()`` an optimizer may set ``last_step`` to a *new*
list with one JSON-safe dict per parameter that had feedback: ``{"index": <position across
param groups, as in state_dict>, "role", "before", "after", "feedback": [str], "verdict":
"accepted" | "rejected" | "rolled_back", "reason": str | None}``. When a rejected or rolled
back entry's ``after`` differs from the parameter's value after the step (the optimizer
reported the proposal it did not keep), the history stores it as ``proposal``.

Example:
    >>> import afnio
    >>> from afnio.optim import Optimizer
    >>> class Upper(Optimizer):
    ...     def step(self, closure=None):
    ...         with afnio.no_grad():
    ...             for p in self.param_groups[0]["params"]:
    ...                 p.copy_(p.data.upper())
    >>> prompt = afnio.Variable("be brief", role="system prompt", requires_grad=True)
    >>> optimizer = Upper([prompt], defaults={})
    >>> recorder = StepRecorder(None, [optimizer])
    >>> prompt.append_grad(afnio.Variable("shout"))
    >>> recorder.before_update()
    >>> optimizer.step()
    >>> [(p["before"], p["after"], p["feedback"], p["verdict"]) for p in recorder.after_update()]
    [('be brief', 'BE BRIEF', ['shout'], 'accepted')]
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afnio._variable import Variable
from afnio.models.model import ChatCompletionModel
from afnio.models.registry import get_backward_model_client
from afnio.models.usage import Usage
from afnio.trainer.history import json_safe

__all__ = ["OTHER_USAGE", "StepRecorder", "WatchedParameter", "client_label"]

logger = logging.getLogger(__name__)

OTHER_USAGE = "other"
"""Usage label of spending by clients the Trainer cannot reach."""

_VERDICTS = ("accepted", "rejected", "rolled_back")


@dataclass
class WatchedParameter:
    """An optimized parameter: its name in the agent, its optimizer and index there."""

    name: str
    optimizer: int
    index: int
    variable: Variable


def client_label(client: ChatCompletionModel) -> str:
    """The usage label of a client: ``provider/model`` (or the class name without a model).

    Example:
        >>> from afnio.testing import ScriptedModel
        >>> client_label(ScriptedModel(["hi"]))
        'scripted/scripted'
    """
    provider = client.provider or type(client).__name__
    return f"{provider}/{client.model}" if client.model else provider


def _feedback(variable: Variable) -> list[str]:
    texts: list[str] = []
    for gradient in variable.grad:
        data = gradient.data
        items = data if isinstance(data, list) else [data]
        texts.extend(str(item) for item in items if str(item).strip())
    return texts


def _has_usage(usage: Usage) -> bool:
    return bool(usage.requests or usage.total_tokens or usage.cached_tokens or usage.cost_usd)


def _rounded(usage: Usage) -> dict[str, int | float]:
    values = usage.as_dict()
    values["cost_usd"] = round(values["cost_usd"], 10)
    return values


class StepRecorder:
    """Records parameters, feedback, verdicts and per-model usage around training steps.

    Args:
        agent: The Module being trained (``named_parameters`` names the parameters,
            ``named_models`` finds its clients); ``None`` names parameters by position.
        optimizers: The optimizers whose parameters are watched.
    """

    def __init__(self, agent: Any, optimizers: Sequence[Any]) -> None:
        self.agent = agent
        self.optimizers = list(optimizers)
        self.parameters = self._watched()
        self._before: dict[tuple[int, int], tuple[Any, list[str]]] | None = None
        self._last_steps: list[Any] = []
        self._clients: dict[int, ChatCompletionModel] = {}
        self._client_usage: dict[int, Usage] = {}
        self._total_before = Usage()

    # ------------------------------------------------------------------ parameters
    def _watched(self) -> list[WatchedParameter]:
        names: dict[int, str] = {}
        named = getattr(self.agent, "named_parameters", None)
        if callable(named):
            for name, parameter in named():
                names.setdefault(id(parameter), name)
        watched = []
        for number, optimizer in enumerate(self.optimizers):
            seen: dict[int, int] = {}
            for group in getattr(optimizer, "param_groups", []):
                for parameter in group.get("params", []):
                    if id(parameter) in seen:
                        continue
                    seen[id(parameter)] = index = len(seen)
                    default = f"optimizers[{number}].params[{index}]"
                    name = names.get(id(parameter), default)
                    watched.append(WatchedParameter(name, number, index, parameter))
        return watched

    def describe_parameters(self) -> list[dict[str, Any]]:
        """Each watched parameter's ``name``, ``role``, ``optimizer``, ``index`` and ``value``."""
        return [
            {
                "name": p.name,
                "role": p.variable.role,
                "optimizer": p.optimizer,
                "index": p.index,
                "value": json_safe(p.variable.data),
            }
            for p in self.parameters
        ]

    def begin_step(self, total: Usage) -> None:
        """Forget the last step's snapshot and start measuring usage (see :meth:`start_usage`)."""
        self._before = None
        self.start_usage(total)

    def before_update(self) -> None:
        """Snapshot every parameter's value and feedback (call right before ``step()``)."""
        self._before = {
            (p.optimizer, p.index): (copy.deepcopy(p.variable.data), _feedback(p.variable))
            for p in self.parameters
        }
        self._last_steps = [getattr(optimizer, "last_step", None) for optimizer in self.optimizers]

    def _verdicts(self, number: int) -> dict[int, Mapping[str, Any]]:
        """The fresh ``last_step`` entries of optimizer ``number``, by parameter index."""
        last = getattr(self.optimizers[number], "last_step", None)
        stale = number < len(self._last_steps) and last is self._last_steps[number]
        if last is None or stale:
            return {}
        if not isinstance(last, list):
            logger.warning(
                "%s.last_step should be a list of dicts, got %s; verdicts are derived from the "
                "parameter values instead",
                type(self.optimizers[number]).__name__,
                type(last).__name__,
            )
            return {}
        return {
            entry["index"]: entry
            for entry in last
            if isinstance(entry, Mapping) and isinstance(entry.get("index"), int)
        }

    def after_update(self, feedback_now: bool = False) -> list[dict[str, Any]]:
        """What changed since :meth:`before_update`.

        Args:
            feedback_now: Read the feedback from the parameters' ``grad`` now instead of from
                the snapshot (manual optimization: the step's own ``backward`` came after it).

        Returns:
            One entry per parameter that got feedback, changed, or was reported by its
            optimizer's ``last_step``; nothing when no snapshot was taken since
            :meth:`begin_step`.
        """
        if self._before is None:
            return []
        verdicts = [self._verdicts(number) for number in range(len(self.optimizers))]
        entries = []
        for p in self.parameters:
            before, feedback = self._before[(p.optimizer, p.index)]
            if feedback_now:
                feedback = _feedback(p.variable)
            after = p.variable.data
            reported = verdicts[p.optimizer].get(p.index)
            if not feedback and before == after and reported is None:
                continue
            entry: dict[str, Any] = {
                "name": p.name,
                "role": p.variable.role,
                "optimizer": p.optimizer,
                "index": p.index,
                "before": json_safe(before),
                "after": json_safe(after),
                "feedback": feedback,
                "verdict": "accepted" if before != after else "unchanged",
                "reason": None,
            }
            if reported is not None:
                verdict = reported.get("verdict")
                if isinstance(verdict, str) and verdict:
                    entry["verdict"] = verdict
                reason = reported.get("reason")
                entry["reason"] = None if reason is None else str(reason)
                if not feedback and isinstance(reported.get("feedback"), list):
                    entry["feedback"] = [str(text) for text in reported["feedback"]]
                proposal = reported.get("after")
                if entry["verdict"] in _VERDICTS[1:] and proposal is not None:
                    proposal = json_safe(proposal)
                    if proposal != entry["after"]:
                        entry["proposal"] = proposal
            entries.append(entry)
        return entries

    # ------------------------------------------------------------------ usage
    def _reachable_clients(self) -> list[ChatCompletionModel]:
        found: list[Any] = []
        named_models = getattr(self.agent, "named_models", None)
        if callable(named_models):
            found.extend(client for _, client in named_models())
        for optimizer in self.optimizers:
            for group in getattr(optimizer, "param_groups", []):
                found.extend(group.values())
        found.append(get_backward_model_client())
        clients: dict[int, ChatCompletionModel] = {}
        for client in found:
            if isinstance(client, ChatCompletionModel):
                clients.setdefault(id(client), client)
        return list(clients.values())

    def start_usage(self, total: Usage) -> None:
        """Snapshot every reachable client's usage and the run-wide ``total`` so far."""
        self._clients = {id(client): client for client in self._reachable_clients()}
        self._client_usage = {
            key: Usage(**client.get_usage()) for key, client in self._clients.items()
        }
        self._total_before = Usage(**total.as_dict())

    def stop_usage(self, total: Usage) -> dict[str, Any]:
        """What was spent since :meth:`start_usage`: ``{"total": ..., "by_model": {...}}``.

        Args:
            total: The run-wide usage now (the same counter given to :meth:`start_usage`).
        """
        spent_total = _subtract(total, self._total_before)
        by_model: dict[str, Usage] = {}
        known = Usage()
        for key, client in self._clients.items():
            spent = _subtract(Usage(**client.get_usage()), self._client_usage[key])
            if not _has_usage(spent):
                continue
            label = client_label(client)
            by_model[label] = by_model.get(label, Usage()) + spent
            known += spent
        rest = _subtract(spent_total, known)
        if rest.requests > 0 or rest.total_tokens > 0 or rest.cost_usd > 1e-12:
            by_model[OTHER_USAGE] = by_model.get(OTHER_USAGE, Usage()) + rest
        return {
            "total": _rounded(spent_total),
            "by_model": {label: _rounded(usage) for label, usage in sorted(by_model.items())},
        }


def _subtract(after: Usage, before: Usage) -> Usage:
    minus = before.as_dict()
    return Usage(**{key: value - minus[key] for key, value in after.as_dict().items()})
