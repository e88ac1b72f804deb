"""Property: TGD's momentum state is exactly the last `momentum` (value, feedback) entries."""

import re

from hypothesis import given
from hypothesis import strategies as st

import afnio
from afnio.cognitive.parameter import Parameter
from afnio.optim import TGD
from afnio.testing import ScriptedModel


def rewrite(messages, **kwargs):
    value = re.search(r"<VARIABLE>\n(.*?)\n</VARIABLE>", messages[1]["content"], re.S).group(1)
    return f"<IMPROVED_VARIABLE>{value}+</IMPROVED_VARIABLE>"


feedback_text = st.sampled_from(["", "  ", "shorter", "mention prices", "be formal", "a\nb"])
# One step: for each of the 3 parameters, the list of feedback texts it receives.
step = st.lists(st.lists(feedback_text, max_size=3), min_size=3, max_size=3)


@given(momentum=st.integers(0, 4), steps=st.lists(step, min_size=1, max_size=7))
def test_state_keeps_exactly_the_last_momentum_entries_in_order(momentum, steps):
    model = ScriptedModel(rewrite)
    params = [Parameter(f"p{i}", role=f"prompt {i}") for i in range(3)]
    opt = TGD(params, model_client=model, momentum=momentum)
    history = {id(p): [] for p in params}

    for feedback_per_param in steps:
        opt.zero_grad()
        for param, texts in zip(params, feedback_per_param):
            for text in texts:
                param.append_grad(afnio.Variable(text, role="feedback"))
        before = [p.data for p in params]
        model.reset()
        opt.step()
        for param, old, texts in zip(params, before, feedback_per_param):
            shown = [text.strip() for text in texts if text.strip()]
            if shown:
                history[id(param)].append({"value": old, "gradients": shown})
                assert param.data == old + "+"
            else:
                assert param.data == old
        assert model.calls == sum(any(t.strip() for t in texts) for texts in feedback_per_param)

    for param in params:
        expected = history[id(param)][-momentum:] if momentum else []
        assert opt.state.get(param, {}).get("momentum_buffer", []) == expected
        if momentum:
            assert len(opt.state.get(param, {}).get("momentum_buffer", [])) == min(
                momentum, len(history[id(param)])
            )
    assert opt.state_dict()["state"] == {
        index: {"momentum_buffer": history[id(p)][-momentum:]}
        for index, p in enumerate(params)
        if momentum and history[id(p)]
    }
