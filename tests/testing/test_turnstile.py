"""Turnstile: waves, release orders, one-at-a-time completion, errors."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio._runtime import run
from afnio.testing import ScriptedModel, Turnstile, TurnstileTimeout, completion_orders


async def finish_order(gate: Turnstile, names: str) -> list[str]:
    """Start one job per name at once; return the order in which they finished."""
    finished: list[str] = []

    async def job(name: str) -> None:
        async with gate.turn(name):
            finished.append(name)

    await asyncio.gather(*(job(name) for name in names))
    return finished


@pytest.mark.parametrize(
    ("order", "expected"),
    [("forward", "abcde"), ("reverse", "edcba"), ("rotate", "bcdea"),
     (lambda keys: [2, 0, 4, 1, 3], "caebd")],
)
def test_named_and_custom_orders(order, expected):
    gate = Turnstile(order)
    assert "".join(asyncio.run(finish_order(gate, "abcde"))) == expected
    assert gate.arrivals == list("abcde") and "".join(gate.releases) == expected
    assert gate.reordered == (expected != "abcde")


@given(st.integers(0, 2**32 - 1), st.integers(1, 12))
def test_seeded_shuffles_are_permutations_and_repeatable(seed, n):
    names = "".join(chr(ord("a") + i) for i in range(n))
    first = asyncio.run(finish_order(Turnstile(seed), names))
    again = asyncio.run(finish_order(Turnstile(seed), names))
    assert sorted(first) == list(names) and first == again


@given(completion_orders())
def test_the_strategy_gives_valid_orders(order):
    assert sorted(asyncio.run(finish_order(Turnstile(order), "abc"))) == list("abc")


def test_a_call_finishes_before_the_next_is_released():
    gate = Turnstile("reverse")
    events: list[str] = []

    async def job(name: str) -> None:
        async with gate.turn(name):
            events.append(f"start {name}")
            await asyncio.sleep(0)  # the next call must still wait for this one
            events.append(f"end {name}")

    async def main() -> None:
        await asyncio.gather(job("a"), job("b"))

    asyncio.run(main())
    assert events == ["start b", "end b", "start a", "end a"]


def test_expected_waves_hold_until_full_and_prove_overlap():
    gate = Turnstile("reverse", expected=[3, 2])
    in_flight = {"now": 0, "max": 0}

    async def job(name: str) -> None:
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await gate.wait(name)
        in_flight["now"] -= 1

    async def main() -> None:
        await asyncio.gather(job("a"), job("b"), job("c"))
        await asyncio.gather(job("d"), job("e"))

    asyncio.run(main())
    assert gate.releases == ["c", "b", "a", "e", "d"] and in_flight["max"] == 3


def test_a_wave_that_never_fills_fails_its_calls_clearly():
    gate = Turnstile(expected=3, timeout=0.05)

    async def main() -> None:
        await asyncio.gather(gate.wait("a"), gate.wait("b"))

    with pytest.raises(TurnstileTimeout, match="wave of 3 calls; only 2 arrived"):
        asyncio.run(main())


def test_wrap_gates_a_scripted_model_and_keeps_results_in_place():
    gate = Turnstile("reverse", expected=4)
    model = ScriptedModel(gate.wrap(lambda messages, **kw: messages[-1]["content"].upper(),
                                    key=lambda messages, **kw: messages[-1]["content"]))

    async def main() -> list[str]:
        return await asyncio.gather(
            *(model.achat([{"role": "user", "content": name}]) for name in "wxyz")
        )

    assert run(main()) == ["W", "X", "Y", "Z"]
    assert gate.arrivals == list("wxyz") and gate.releases == list("zyxw")
    assert model.max_in_flight == 4


def test_a_cancelled_waiting_call_is_skipped():
    gate = Turnstile("forward", expected=[2])

    async def main() -> list[str]:
        done: list[str] = []

        async def job(name: str) -> None:
            await gate.wait(name)
            done.append(name)

        doomed = asyncio.ensure_future(job("a"))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        await asyncio.gather(job("b"), job("c"))
        return done

    assert asyncio.run(main()) == ["b", "c"]


def test_bad_arguments_and_bad_permutations():
    with pytest.raises(ValueError, match="unknown order 'sideways'"):
        Turnstile("sideways")
    with pytest.raises(ValueError, match="order must be a name, an int seed or a function"):
        Turnstile(1.5)
    with pytest.raises(ValueError, match="wave sizes must be ints >= 1"):
        Turnstile(expected=[2, 0])
    with pytest.raises(ValueError, match="settle must be >= 1"):
        Turnstile(settle=0)
    gate = Turnstile(lambda keys: [0, 0])
    with pytest.raises(ValueError, match=r"returned \[0, 0\] for 2 waiting calls"):
        asyncio.run(finish_order(gate, "ab"))


def test_calls_from_two_loops_are_refused():
    gate = Turnstile()
    asyncio.run(finish_order(gate, "a"))

    async def elsewhere() -> None:
        await gate.wait("c")

    with asyncio.Runner() as other:
        # The first loop is closed now, so a new loop may take over...
        other.run(finish_order(gate, "b"))
        # ...but not while the bound loop is still open.
        with pytest.raises(RuntimeError, match="same event loop"):
            asyncio.run(elsewhere())
