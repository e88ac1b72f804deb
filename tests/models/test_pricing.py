"""Prices from model_prices.json, snapshot names, and the once-only warning for unknown models."""

import json
import warnings
from importlib import resources

import pytest

from afnio.models.pricing import FREE_PROVIDERS, cost_usd, price_for, set_price

PRICES = json.loads(resources.files("afnio.models").joinpath("model_prices.json").read_text())


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "gpt-4o",
        "gpt-4o-mini",
        "o3",
        "o4-mini",
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "claude-opus-4",
        "claude-sonnet-4",
        "claude-3-5-haiku",
        "claude-haiku-4-5",
        "claude-sonnet-4-5",
    ],
)
def test_current_models_are_priced(model):
    assert price_for(model) is not None


def test_every_row_is_sane():
    for name, row in PRICES["models"].items():
        assert row["input"] > 0 and row["output"] > 0, name
        assert 0 < row.get("cached_input", row["input"]) <= row["input"], name
        if name.startswith("claude"):
            assert row["cache_write"] >= row["input"], name


@pytest.mark.parametrize(
    ("snapshot", "base"),
    [
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("o3-2025-04-16", "o3"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ],
)
def test_snapshots_use_their_base_price(snapshot, base):
    assert price_for(snapshot) == price_for(base)


def test_a_listed_snapshot_keeps_its_own_price():
    assert price_for("gpt-4o-2024-05-13").input == 5.0
    assert price_for("gpt-4o-2024-08-06").input == 2.5


def test_cost_counts_cached_and_cache_write_tokens_at_their_prices():
    cost = cost_usd(
        "anthropic",
        "claude-sonnet-4-5",
        prompt_tokens=1_000_000,
        completion_tokens=100_000,
        cached_tokens=500_000,
        cache_write_tokens=200_000,
    )
    assert cost == pytest.approx(
        (300_000 * 3.0 + 500_000 * 0.3 + 200_000 * 3.75 + 100_000 * 15.0) / 1e6
    )


def test_unknown_model_costs_zero_and_warns_once():
    with pytest.warns(UserWarning, match="no price known for openai model 'mystery-model-1'"):
        assert cost_usd("openai", "mystery-model-1", prompt_tokens=10, completion_tokens=5) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cost_usd("openai", "mystery-model-1", prompt_tokens=10, completion_tokens=5) == 0


@pytest.mark.parametrize("provider", sorted(FREE_PROVIDERS))
def test_local_models_are_free_without_warning(provider):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cost_usd(provider, "gpt-4.1", prompt_tokens=10**6, completion_tokens=10**6) == 0


def test_set_price_adds_a_model():
    set_price("test-finetune-xyz", input=1.0, output=2.0, cached_input=0.5)
    assert cost_usd(
        "openai",
        "test-finetune-xyz",
        prompt_tokens=1000,
        completion_tokens=1000,
        cached_tokens=1000,
    ) == pytest.approx((500 + 2000) / 1e6)
    with pytest.raises(ValueError, match="output price of 'bad' is negative"):
        set_price("bad", input=1.0, output=-1.0)
    assert price_for("bad") is None
