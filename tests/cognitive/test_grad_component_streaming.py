"""A GradComponent's backward engine hands each input's gradient on the moment it is written.

The backward model holds the request about the second component's shared ``doc_string`` until a
request about the *first* component has arrived (an event, with a long guard timeout that only
a backward holding the fast gradient back would reach): so the first component's backward must
start while the second one's shared request is still in flight.
"""

import asyncio

import afnio
from afnio.cognitive import FunGradComponent, GradComponent, Parameter
from afnio.testing import ScriptedModel

GUARD = 30


class Exclaim(GradComponent):
    def call(self, text):
        return text + "!"


def test_the_first_component_runs_while_the_seconds_shared_request_is_in_flight():
    arrived = asyncio.Event()

    async def reply(messages, **kwargs):
        prompt = messages[-1]["content"]
        if prompt.startswith("Component: Exclaim"):
            arrived.set()
        if "Input under review: [doc_string]" in prompt:
            await asyncio.wait_for(arrived.wait(), GUARD)
        target = prompt.split("Input under review: ")[1].split(" ")[0]
        return f"<FEEDBACK>change {target} of {prompt.split()[1]}</FEEDBACK>"

    critic = ScriptedModel(reply)
    first = Exclaim("Adds an exclamation mark")
    shout = FunGradComponent(
        fun=lambda text: text.upper(), desc="Shouts",
        doc_string=Parameter("Shout it.", role="shouting instructions", requires_grad=True),
    )
    x = afnio.Variable(["a", "b"], role="drafts", requires_grad=True)
    with afnio.settings(backward_model_client=critic):
        out = shout(first(x))
    assert out.data == ["A!", "B!"]
    out.backward(afnio.Variable(["too loud", "too quiet"]))
    assert [g.data for g in x.grad] == [["change [arg_0] of Exclaim", "change [arg_0] of Exclaim"]]
    assert [g.data for g in shout.doc_string.grad] == ["change [doc_string] of <lambda>"]
    # Two per-sample requests for each component's text input, one for the doc_string.
    assert critic.calls == 5
