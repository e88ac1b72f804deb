"""The :class:`Optimizer` base class, shaped like ``torch.optim.Optimizer``.

An optimizer holds ``param_groups`` (dicts with a ``"params"`` list plus the group's options,
missing options filled from ``defaults``) and a per-parameter ``state``. Subclasses implement
:meth:`Optimizer.step`.

Example:
    >>> import afnio
    >>> from afnio.optim import Optimizer
    >>> class Upper(Optimizer):
    ...     def step(self, closure=None):
    ...         loss = self._evaluate_closure(closure)
    ...         with afnio.no_grad():
    ...             for group in self.param_groups:
    ...                 for p in group["params"]:
    ...                     if p.grad:
    ...                         p.copy_(p.data.upper())
    ...         return loss
    >>> p = afnio.Variable("be brief", role="system prompt", requires_grad=True)
    >>> opt = Upper([p], defaults={})
    >>> p.append_grad(afnio.Variable("shout"))
    >>> opt.step()
    >>> p.data
    'BE BRIEF'
"""

from __future__ import annotations

import abc
import copy
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, TypeVar

from afnio._variable import Variable
from afnio.autodiff.grad_mode import enable_grad
from afnio.models.model import ChatCompletionModel, client_from_config, client_to_config

__all__ = ["Optimizer", "ParamsT", "required"]

T = TypeVar("T")

ParamsT = Iterable[Variable] | Iterable[dict[str, Any]]
"""What optimizers accept as ``params``: Variables, or dicts describing parameter groups."""

_CLIENT_KEY = "__model_client__"
_UNORDERED = (
    "optimizer parameters need to be organized in ordered collections, but the ordering of "
    "variables in sets will change between runs. Please use a list instead."
)


class _RequiredParameter:
    """Marks a default with no value: every parameter group must then set that option."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _RequiredParameter()
"""Sentinel default: a group that does not set this option is rejected, as in torch."""


def _to_plain(value: Any) -> Any:
    """The saveable form of a group option: clients become ``{"__model_client__": config}``,
    Variables their data; containers are walked."""
    if isinstance(value, ChatCompletionModel):
        return {_CLIENT_KEY: client_to_config(value)}
    if isinstance(value, Variable):
        return copy.deepcopy(value.data)
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return copy.deepcopy(value)


def _from_plain(value: Any) -> Any:
    """Inverse of :func:`_to_plain` for model clients (rebuilt from class and config)."""
    if isinstance(value, dict):
        if set(value) == {_CLIENT_KEY}:
            return client_from_config(value[_CLIENT_KEY])
        return {key: _from_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_plain(item) for item in value]
    return value


def _holds_client(value: Any) -> bool:
    """Whether a saved group option is, or contains, a model client description."""
    if isinstance(value, dict):
        return set(value) == {_CLIENT_KEY} or any(_holds_client(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_client(item) for item in value)
    return False


def _keep_clients(live: Any, saved: Any) -> Any:
    """``saved`` rebuilt with the live option's clients where the saved one describes one."""
    if isinstance(live, ChatCompletionModel):
        return live
    if isinstance(saved, dict) and isinstance(live, dict):
        return {key: _keep_clients(live.get(key), item) for key, item in saved.items()}
    if isinstance(saved, list) and isinstance(live, (list, tuple)) and len(saved) == len(live):
        return [_keep_clients(a, b) for a, b in zip(live, saved)]
    if _holds_client(saved):
        raise ValueError("a saved model client has no live client in the same place to keep; "
                         "pass load_clients=True to rebuild it from the file")
    return _from_plain(saved)


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, ChatCompletionModel):
        text = f"{type(value).__name__}(model={value.model!r})"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Optimizer(abc.ABC):
    """Base class of all optimizers, with the semantics of ``torch.optim.Optimizer``.

    Args:
        params: An iterable of Variables (usually :class:`~afnio.cognitive.parameter.Parameter`)
            or of dicts, each defining a parameter group with a ``"params"`` entry and any
            options that override ``defaults``.
        defaults: Default option values for every group. A default set to :data:`required` must
            be given by every group.

    Attributes:
        defaults: The default options.
        param_groups: The parameter groups, each a dict with ``"params"`` and every option.
        state: Per-parameter state (a ``defaultdict(dict)`` keyed by the parameter itself).
        last_step: What the last :meth:`step` did, one JSON-safe dict per parameter it
            considered: ``{"index", "role", "before", "after", "feedback", "verdict",
            "reason"}`` (``index`` as in :meth:`state_dict`; ``verdict`` is ``"accepted"``,
            ``"rejected"`` or ``"rolled_back"``). Optimizers may add fields.
        needs_closure: Class attribute: ``True`` when :meth:`step` compares scores and so
            needs a closure (see :mod:`afnio.optim.scoring`); the Trainer then builds one.
        uses_gradients: Class attribute: ``False`` when the optimizer ignores textual
            gradients (the Trainer then skips ``backward()`` if no optimizer uses them).

    Raises:
        TypeError: If ``params`` is a single Variable or a set, or holds something other than
            Variables.
        ValueError: If ``params`` is empty, a parameter is not a leaf, a parameter appears in
            more than one group, or a group misses a required option.
    """

    needs_closure: bool = False
    uses_gradients: bool = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self.last_step: list[dict[str, Any]] = []
        if isinstance(params, Variable):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Variables or "
                f"dicts, but got {type(params).__name__}"
            )
        if isinstance(params, (set, frozenset)):
            raise TypeError(_UNORDERED)
        self.state: defaultdict[Variable, dict[str, Any]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        param_groups = list(params)
        if len(param_groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for group in param_groups:
            self.add_param_group(group)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, filling options it does not set from ``defaults``.

        Useful when fine-tuning: frozen parts of a program can join the optimization later.

        Args:
            param_group: A dict with ``"params"`` (a Variable or an ordered iterable of them) and
                optional per-group options.

        Raises:
            TypeError: If ``param_group`` is not a dict, its params are a ``set``, or one of them
                is not a Variable.
            ValueError: If a parameter is not a leaf, a required option is missing, or a
                parameter is already in another group.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, Variable):
            param_group["params"] = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(_UNORDERED)
        else:
            param_group["params"] = list(params)

        for param in param_group["params"]:
            if not isinstance(param, Variable):
                raise TypeError(
                    "optimizer can only optimize Variables, but one of the params is "
                    f"{type(param).__name__}"
                )
            if not (param.is_leaf or param.retains_grad):
                raise ValueError(f"can't optimize a non-leaf Variable (role {param.role!r})")

        for name, default in self.defaults.items():
            if default is required and name not in param_group:
                raise ValueError(
                    "parameter group didn't specify a value of required optimization "
                    f"parameter {name}"
                )
            param_group.setdefault(name, default)

        params = param_group["params"]
        if len(params) != len(set(params)):
            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters; the duplicates "
                "are optimized as one parameter",
                stacklevel=3,
            )
        existing = set(chain.from_iterable(group["params"] for group in self.param_groups))
        if not existing.isdisjoint(params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(param_group)

    # ----------------------------------------------------------------- gradients and steps
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients of every parameter, as ``torch.optim.Optimizer.zero_grad``.

        ``grad`` is a list and stays one, so ``step`` and the Trainer read it as before; the two
        modes differ, as in torch, in what happens to a reference to the old gradients.

        Args:
            set_to_none: ``True`` (default, torch's default): give each parameter a new empty
                list (``p.grad = None`` does the same), so a list read before, e.g. kept for a
                report, keeps its gradients. ``False``: empty each list in place, so every
                holder of it sees ``[]`` (torch zeroes the tensor in place).

        Example:
            >>> import afnio
            >>> p = afnio.Variable("Be brief.", role="system prompt", requires_grad=True)
            >>> class Keep(Optimizer):
            ...     def step(self, closure=None):
            ...         return self._evaluate_closure(closure)
            >>> opt = Keep([p], defaults={})
            >>> p.append_grad(afnio.Variable("too short"))
            >>> kept = p.grad
            >>> opt.zero_grad(set_to_none=False)
            >>> p.grad, kept
            ([], [])
        """
        for group in self.param_groups:
            for param in group["params"]:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.clear()

    clear_grad = zero_grad

    @abc.abstractmethod
    def step(self, closure: Callable[[], T] | None = None) -> T | None:
        """Perform one optimization step.

        Args:
            closure: A callable that re-evaluates the program and returns the loss. It runs
                under ``enable_grad`` (see :meth:`_evaluate_closure`).

        Returns:
            The closure's result, or ``None`` without a closure.
        """

    @staticmethod
    def _evaluate_closure(closure: Callable[[], T] | None) -> T | None:
        """Run ``closure`` with gradients enabled and return its result (``None`` if absent)."""
        if closure is None:
            return None
        with enable_grad():
            return closure()

    def _param_indices(self) -> dict[int, int]:
        """``id(parameter) -> index`` across all groups, as :meth:`state_dict` numbers them."""
        index_of: dict[int, int] = {}
        for group in self.param_groups:
            for param in group["params"]:
                index_of.setdefault(id(param), len(index_of))
        return index_of

    # ----------------------------------------------------------------- saving
    def state_dict(self) -> dict[str, Any]:
        """Return the optimizer's state as plain data, as ``torch.optim.Optimizer`` does.

        Parameters are referenced by their index across all groups (in group order); ``state``
        is keyed by those indices and each group's ``"params"`` lists them. Model clients in the
        group options are saved by class and config (never an API key), Variables by their data.

        Returns:
            ``{"state": {index: state}, "param_groups": [options with "params": [indices]]}``.
        """
        index_of: dict[int, int] = {}
        next_index = 0

        def pack_group(group: dict[str, Any]) -> dict[str, Any]:
            nonlocal next_index
            packed = {key: _to_plain(value) for key, value in group.items() if key != "params"}
            for param in group["params"]:
                if id(param) not in index_of:
                    index_of[id(param)] = next_index
                    next_index += 1
            packed["params"] = [index_of[id(param)] for param in group["params"]]
            return packed

        param_groups = [pack_group(group) for group in self.param_groups]
        packed_state = {
            (index_of[id(key)] if isinstance(key, Variable) else key): copy.deepcopy(value)
            for key, value in self.state.items()
        }
        return {"state": packed_state, "param_groups": param_groups}

    def load_state_dict(self, state_dict: dict[str, Any], *, load_clients: bool = False) -> None:
        """Load a state produced by :meth:`state_dict`.

        As in torch, the saved group options replace the current ones — except model clients:
        a group keeps its live client (with its endpoint, cache, limits, usage and key) unless
        ``load_clients=True``. The whole state is checked before anything changes.

        Args:
            state_dict: The saved state. State keys may also be decimal strings, as after a
                round trip through JSON.
            load_clients: Rebuild each client whose saved description differs from the group's
                live one, from that description (afnio's own client classes, or ones registered
                with :func:`~afnio.models.register_client_class`), endpoint and cache path
                included. Only for states you trust.

        Raises:
            ValueError: If the state is malformed, the number of groups or the size of a group
                differs from this optimizer's, or a saved client can't be placed (a group
                without a live client for it and ``load_clients=False``). Nothing is changed
                then.

        Example:
            >>> import afnio
            >>> from afnio.optim import TGD
            >>> from afnio.testing import ScriptedModel
            >>> prompt = afnio.cognitive.Parameter("Be brief.", role="system prompt")
            >>> optimizer = TGD([prompt], model_client=ScriptedModel(), momentum=2)
            >>> optimizer.load_state_dict(optimizer.state_dict())
            >>> optimizer.param_groups[0]["momentum"]
            2
        """
        self._prepare_load_state_dict(state_dict, load_clients=load_clients)()

    def _prepare_load_state_dict(
        self, state_dict: Any, *, load_clients: bool = False
    ) -> Callable[[], None]:
        """Check a saved state and return the update that loads it, changing nothing.

        Raises:
            ValueError: As :meth:`load_state_dict`.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or (
            not isinstance(state_dict.get("param_groups"), list)
        ):
            raise ValueError(
                f"{name}.load_state_dict: expected {{'state': dict, 'param_groups': list}}, got "
                f"{_short(state_dict)}"
            )
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        for index, saved in enumerate(saved_groups):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(
                    f"{name}.load_state_dict: param_groups[{index}] must be a dict with a "
                    f"'params' list, got {_short(saved)}"
                )
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
        saved_indices = list(chain.from_iterable(group["params"] for group in saved_groups))
        if any(isinstance(i, bool) or not isinstance(i, int) for i in saved_indices) or len(
            set(saved_indices)
        ) != len(saved_indices):
            raise ValueError(
                f"{name}.load_state_dict: each group's 'params' must list distinct parameter "
                f"indices, got {_short(saved_indices)}"
            )
        param_of = dict(
            zip(saved_indices, chain.from_iterable(group["params"] for group in groups))
        )
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if isinstance(key, str) and key.isdigit():  # indices that went through JSON
                key = int(key)
            if key not in param_of:
                raise ValueError(
                    f"{name}.load_state_dict: state for parameter index {key!r}, which no "
                    "group lists"
                )
            if not isinstance(value, dict):
                raise ValueError(
                    f"{name}.load_state_dict: the state of parameter {key} must be a dict, got "
                    f"{_short(value)}"
                )
            state[param_of[key]] = copy.deepcopy(value)

        def update_group(index: int, group: dict[str, Any], saved: dict[str, Any]) -> dict:
            new_group = {"params": group["params"]}
            for key, value in saved.items():
                if key == "params":
                    continue
                live = group.get(key)
                if key in group and _to_plain(live) == value:
                    new_group[key] = live
                elif _holds_client(value) and not load_clients:
                    if not _holds_client(_to_plain(live)):
                        raise ValueError(
                            f"{name}.load_state_dict: param_groups[{index}][{key!r}] is a saved "
                            "model client but this optimizer's group has no client there to "
                            "keep; pass load_clients=True to rebuild it from the file (only "
                            "for files you trust)"
                        )
                    new_group[key] = _keep_clients(live, value)
                else:
                    try:
                        new_group[key] = _from_plain(value)
                    except ValueError as error:
                        raise ValueError(
                            f"{name}.load_state_dict: param_groups[{index}][{key!r}]: {error}"
                        ) from None
            return new_group

        new_groups = [update_group(i, g, s) for i, (g, s) in enumerate(zip(groups, saved_groups))]

        def commit() -> None:
            self.param_groups = new_groups
            self.state = state

        return commit

    # ----------------------------------------------------------------- printing
    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            for key in sorted(group):
                if key != "params":
                    lines.append(f"    {key}: {_short(group[key])}")
        lines.append(")")
        return "\n".join(lines)
