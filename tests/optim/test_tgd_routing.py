"""Routing property of TGD: each parameter is rewritten from its own feedback, by its group's model.

Every parameter's value is its own token (``P3``) and every piece of feedback its own token
(``fb3x1``: parameter 3, gradient 1); each group has its own
optimizer model, which answers ``P3 upd[<feedback tokens it was shown, in order>]``. One
:class:`~afnio.testing.Turnstile` releases the requests of every group in adversarial order, so a
proposal written to the wrong parameter, or feedback shown to the wrong request, is caught.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.cognitive.parameter import Parameter
from afnio.optim import TGD
from afnio.testing import ScriptedModel, Turnstile, completion_orders

PARAM_TOKEN = re.compile(r"\bP\d+\b")
FB_TOKEN = re.compile(r"\bfb\d+x\d+\b")


def _unique(tokens):
    return list(dict.fromkeys(tokens))


def rewrite(messages, **kwargs):
    prompt = "\n".join(m["content"] for m in messages)
    params = _unique(PARAM_TOKEN.findall(prompt))
    feedback = _unique(FB_TOKEN.findall(prompt))
    return f"<IMPROVED_VARIABLE>{' '.join(params)} upd[{','.join(feedback)}]</IMPROVED_VARIABLE>"


@st.composite
def setups(draw):
    n_params = draw(st.integers(1, 6))
    n_groups = draw(st.integers(1, min(3, n_params)))
    groups = [draw(st.integers(0, n_groups - 1)) for _ in range(n_params)]
    # Per parameter: how many gradients it gets, and which of them are empty.
    grads = [draw(st.lists(st.booleans(), max_size=3)) for _ in range(n_params)]
    return groups, grads


@given(setups(), completion_orders())
def test_each_parameter_is_rewritten_from_its_own_feedback(setup, order):
    groups, grad_shapes = setup
    gate = Turnstile(order)
    params = [Parameter(f"P{j}", role=f"prompt number {j}") for j in range(len(groups))]
    models = [ScriptedModel(gate.wrap(rewrite), model=f"optimizer {g}")
              for g in range(max(groups) + 1)]
    optimizer = TGD(
        [{"params": [p for p, g in zip(params, groups) if g == k], "model_client": model}
         for k, model in enumerate(models) if k in groups],
        model_client=models[0],
    )
    shown: list[list[str]] = []
    for j, (param, shapes) in enumerate(zip(params, grad_shapes)):
        texts = [f"fb{j}x{m}" if non_empty else "" for m, non_empty in enumerate(shapes)]
        for text in texts:
            param.append_grad(afnio.Variable(text, role="feedback"))
        shown.append([text for text in texts if text])
    optimizer.step()
    for j, param in enumerate(params):
        if shown[j]:
            assert param.data == f"P{j} upd[{','.join(shown[j])}]"
        else:
            assert param.data == f"P{j}"
    for k, model in enumerate(models):
        asked = [j for j, g in enumerate(groups) if g == k and shown[j]]
        assert model.calls == len(asked)
        seen = sorted(PARAM_TOKEN.findall(m[-1]["content"])[0] for m, _ in model.requests)
        assert seen == sorted(f"P{j}" for j in asked)
