"""Ray helpers: importing Ray lazily, and an evaluator whose scoring runs as Ray tasks.

Ray is an optional dependency (``pip install "afnio[ray]"``); ``import afnio`` never imports
it. :func:`require_ray` imports it when a feature needs it, with an error saying how to install
it when it is missing.

:class:`RayDeterministicEvaluator` is a
:class:`~afnio.cognitive.modules.evaluator.DeterministicEvaluator` for heavy scoring functions
(running generated code, a retrieval check, a local judge pipeline): each distinct
(prediction, target) pair of a batch is scored by a Ray task, all at once across the cluster,
and the scores then go through the ordinary evaluator, so explanations, ``success_fn``,
reduction and gradients are exactly those of :class:`DeterministicEvaluator` with the same
``eval_fn``. The function is shipped to the workers with Ray's serializer, so define it in an
importable module (or in a module registered with ``ray.cloudpickle.register_pickle_by_value``).

Example (needs Ray and a cluster, hence not run here)::

    import ray
    from afnio.utils.ray import RayDeterministicEvaluator

    ray.init(num_cpus=2)
    passes = RayDeterministicEvaluator(run_unit_tests, "fraction of unit tests passed",
                                       success_fn=lambda score: score == 1.0)
    score, explanation = passes(generated_code, test_suites)
"""

from __future__ import annotations

import builtins
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.basic_ops import broadcast_elements, broadcast_size
from afnio.cognitive import functional as F
from afnio.cognitive.modules.evaluator import DeterministicEvaluator

__all__ = ["RAY_INSTALL_HINT", "RayDeterministicEvaluator", "remote_function", "require_ray"]

RAY_INSTALL_HINT = 'pip install "afnio[ray]"'
"""How to install the Ray extra."""


def require_ray(module: str = "ray", *, feature: str = "this feature") -> ModuleType:
    """Import ``module`` (``"ray"``, ``"ray.tune"``, ...) or explain how to install Ray.

    Args:
        module: The Ray module to import.
        feature: What needs it, for the error message.

    Raises:
        ImportError: If Ray is not installed; the message names ``feature`` and
            :data:`RAY_INSTALL_HINT`.

    Example:
        >>> require_ray("ray.this_does_not_exist")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ImportError: this feature needs ray.this_does_not_exist...
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{feature} needs {module}, which can't be imported ({error}); install Ray with "
            f"{RAY_INSTALL_HINT}"
        ) from None


_remote_functions: dict[Callable[..., Any], Any] = {}


def remote_function(function: Callable[..., Any]) -> Any:
    """``ray.remote(function)``, made once per function (so Ray exports it once).

    Raises:
        ImportError: If Ray is not installed.

    Example:
        >>> remote_function(_score) is remote_function(_score)
        True
    """
    remote = _remote_functions.get(function)
    if remote is None:
        remote = _remote_functions[function] = require_ray().remote(function)
    return remote


def _key(value: Any) -> tuple[str, Any]:
    """A hashable key for one element that keeps 1, 1.0 and True apart."""
    return type(value).__name__, value


class RayDeterministicEvaluator(DeterministicEvaluator):
    """A :class:`~afnio.cognitive.modules.evaluator.DeterministicEvaluator` whose ``eval_fn``
    runs as Ray tasks, one per distinct (prediction, target) pair of a call, concurrently.

    Args:
        eval_fn: ``eval_fn(prediction_element, target_element) -> number``, run in Ray
            workers (it must be serializable by Ray).
        eval_fn_purpose: What ``eval_fn`` measures (quoted in explanations).
        success_fn: ``success_fn(score) -> bool``; successful samples get no feedback.
        reduction_fn: Reduces the per-sample scores (default ``sum``).
        reduction_fn_purpose: What the reduction does (quoted in explanations).
        num_cpus: CPUs Ray reserves for each scoring task.
        **remote_args: More Ray task options (``memory``, ``resources``, ``max_retries``, ...).

    Raises:
        TypeError: If ``eval_fn`` is not callable or ``num_cpus`` not a number.
        ValueError: If ``num_cpus`` is negative.
        ImportError: When called without Ray installed.

    Example:
        >>> evaluator = RayDeterministicEvaluator(len, "length", num_cpus=0.5)
        >>> evaluator
        RayDeterministicEvaluator(eval_fn_purpose='length', num_cpus=0.5)
    """

    def __init__(
        self,
        eval_fn: Callable[[Any, Any], Any],
        eval_fn_purpose: str,
        success_fn: Callable[[Any], bool] | None = None,
        reduction_fn: Callable[[list], Any] = builtins.sum,
        reduction_fn_purpose: str = "summation",
        *,
        num_cpus: float = 1.0,
        **remote_args: Any,
    ) -> None:
        if not callable(eval_fn):
            raise TypeError(
                f"RayDeterministicEvaluator: argument 'eval_fn' must be callable, got {eval_fn!r}"
            )
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)):
            raise TypeError(
                f"RayDeterministicEvaluator: num_cpus must be a number, got {num_cpus!r}"
            )
        if num_cpus < 0:
            raise ValueError(f"RayDeterministicEvaluator: num_cpus must be >= 0, got {num_cpus}")
        super().__init__(eval_fn, eval_fn_purpose, success_fn, reduction_fn, reduction_fn_purpose)
        self.num_cpus = num_cpus
        self.remote_args = dict(remote_args)

    def _remote_scores(self, pairs: list[tuple[Any, Any]]) -> list[Any]:
        ray = require_ray(feature="RayDeterministicEvaluator")
        task = remote_function(_score).options(num_cpus=self.num_cpus, **self.remote_args)
        function = ray.put(self.eval_fn)
        return ray.get([task.remote(function, prediction, target) for prediction, target in pairs])

    def forward(self, prediction: Variable, target: Any) -> tuple[Variable, Variable]:
        """Score every distinct pair in Ray, then evaluate as :class:`DeterministicEvaluator`.

        Raises:
            TypeError: If ``prediction`` is not a Variable or ``target`` isn't Variable data.
            ValueError: If ``prediction`` and ``target`` are batches of different lengths.
            Exception: Whatever ``eval_fn`` raised in its Ray task (Ray re-raises it as an
                error that is also an instance of the original exception's class).
        """
        op = type(self).__name__
        if not isinstance(prediction, Variable):
            raise TypeError(
                f"{op}: argument 'prediction' must be a Variable, got {type(prediction).__name__}"
            )
        reference = target
        if not isinstance(reference, Variable):
            try:
                reference = Variable(reference, role="target")
            except TypeError as exc:
                raise TypeError(f"{op}: argument 'target': {exc}") from None
        size = broadcast_size(op, [prediction, reference])
        pairs = list(zip(broadcast_elements(prediction, size),
                         broadcast_elements(reference, size)))
        distinct: dict[tuple, tuple[Any, Any]] = {}
        for p, t in pairs:
            distinct.setdefault((_key(p), _key(t)), (p, t))
        scores = dict(zip(distinct, self._remote_scores(list(distinct.values()))))

        def lookup(p: Any, t: Any) -> Any:
            return scores[(_key(p), _key(t))]

        return F.deterministic_evaluator(
            prediction, reference, lookup, self.eval_fn_purpose, self.success_fn,
            self.reduction_fn, self.reduction_fn_purpose,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_cpus={self.num_cpus!r}"


def _score(eval_fn: Callable[[Any, Any], Any], prediction: Any, target: Any) -> Any:
    """One scoring task (runs in a Ray worker)."""
    return eval_fn(prediction, target)
