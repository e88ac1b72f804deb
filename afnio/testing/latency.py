"""LatencyModel: how long a simulated request takes, as a real provider's would.

A provider's reply time grows with the prompt (prefill) and with the reply (decoding). The
offline models of :mod:`afnio.testing` (:class:`~afnio.testing.ScriptedModel` and
:class:`~afnio.testing.FakeProviderServer`) take a ``latency=`` that is either a number of seconds
(every request takes that long) or a :class:`LatencyModel`:

    seconds = base + per_prompt_token * prompt tokens + per_output_token * output tokens
              + jitter * u,  u in [0, 1) drawn from (seed, request)

The jitter is a pure function of the seed and the request's text, so the same request always
takes the same time whatever order requests arrive in, and a benchmark can recompute every
request's duration afterwards (:meth:`LatencyModel.seconds`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LatencyModel"]


@dataclass(frozen=True)
class LatencyModel:
    """Seconds a simulated request takes: a base plus per-token costs, plus optional jitter.

    Args:
        base: Seconds every request takes (network round trip, queueing, first token).
        per_prompt_token: Seconds per prompt token (prefill).
        per_output_token: Seconds per output token (decoding).
        jitter: Up to this many seconds more, drawn per request from ``seed`` and the request's
            text (the same request always gets the same draw).
        seed: Seed of the jitter.

    Raises:
        ValueError: If a duration is negative or not finite.

    Example:
        >>> model = LatencyModel(base=0.05, per_prompt_token=0.00002, per_output_token=0.001)
        >>> round(model.seconds(1000, 20), 3)
        0.09
        >>> LatencyModel.of(0.05) == LatencyModel(base=0.05)
        True
    """

    base: float = 0.0
    per_prompt_token: float = 0.0
    per_output_token: float = 0.0
    jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("base", "per_prompt_token", "per_output_token", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"LatencyModel: {name} must be a finite number >= 0, got "
                                 f"{value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LatencyModel: seed must be an int, got {self.seed!r}")

    @classmethod
    def of(cls, latency: LatencyModel | float | dict[str, Any]) -> LatencyModel:
        """``latency`` as a model: a number of seconds is a constant latency, a dict holds the
        fields (as :meth:`as_dict` gives them).

        Raises:
            ValueError: If ``latency`` is none of those, or negative.
        """
        if isinstance(latency, LatencyModel):
            return latency
        if isinstance(latency, dict):
            return cls(**latency)
        if isinstance(latency, bool) or not isinstance(latency, (int, float)):
            raise ValueError(f"latency must be a number of seconds or a LatencyModel, got "
                             f"{latency!r:.80}")
        return cls(base=float(latency))

    @property
    def per_token(self) -> bool:
        """Whether a request's duration depends on its tokens or text (not only ``base``)."""
        return bool(self.per_prompt_token or self.per_output_token or self.jitter)

    def seconds(self, prompt_tokens: int, output_tokens: int, key: str = "") -> float:
        """The duration of a request with these token counts (``key``: the request's text,
        which draws its jitter).

        Example:
            >>> LatencyModel(base=0.01, per_output_token=0.001).seconds(500, 10)
            0.02
        """
        seconds = (
            self.base
            + self.per_prompt_token * prompt_tokens
            + self.per_output_token * output_tokens
        )
        if self.jitter:
            seconds += self.jitter * self._draw(key)
        return seconds

    @staticmethod
    def request_key(texts: Iterable[str]) -> str:
        """The text that draws a request's jitter: its messages' texts, one per line (what
        :class:`~afnio.testing.ScriptedModel` and :class:`~afnio.testing.FakeProviderServer`
        pass as ``key``).

        Example:
            >>> LatencyModel.request_key(["Be brief.", "Hi"])
            'Be brief.\\nHi'
        """
        return "\n".join(texts)

    def _draw(self, key: str) -> float:
        digest = hashlib.blake2b(f"{self.seed}\x00{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def as_dict(self) -> dict[str, Any]:
        """The fields, for a JSON-safe config (:meth:`of` takes it back)."""
        return asdict(self)
