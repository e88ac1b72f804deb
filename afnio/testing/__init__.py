"""Offline test kit: scripted models, a fake provider server, a reference engine and a turnstile.

Everything here is public so you can unit-test your own afnio programs without a network or an
API key.
"""

from afnio.testing.fake_server import FakeProviderServer, FakeReply, Fault
from afnio.testing.latency import LatencyModel
from afnio.testing.reference_engine import reference_backward
from afnio.testing.scripted import ScriptedModel
from afnio.testing.turnstile import Turnstile, TurnstileTimeout, completion_orders

__all__ = [
    "FakeProviderServer",
    "FakeReply",
    "Fault",
    "LatencyModel",
    "ScriptedModel",
    "Turnstile",
    "TurnstileTimeout",
    "completion_orders",
    "reference_backward",
]
