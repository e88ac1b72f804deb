"""What the chain benchmarks share: stage prompts, the ChatCompletion chain over them and the
batch of order questions they answer.

Imported by the benchmark scripts of this folder (``python benchmarks/<name>.py`` puts the folder
on ``sys.path``).
"""

from __future__ import annotations

from afnio._variable import Variable
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.cognitive.parameter import Parameter
from afnio.models import ChatCompletionModel


def stage_prompts(count: int) -> list[Parameter]:
    """One trainable system prompt per stage, ``"Stage k: answer the customer's question."``."""
    return [
        Parameter(f"Stage {k}: answer the customer's question.", role=f"system prompt of stage {k}")
        for k in range(1, count + 1)
    ]


def chain(
    model: ChatCompletionModel,
    prompts: list[Variable],
    x: Variable,
    backward_model_client: ChatCompletionModel | None = None,
) -> Variable:
    """Run ``x`` through one ChatCompletion per prompt, each stage's output feeding the next.

    Stage k sends ``prompts[k]`` as the system message and the previous output as the user
    message (through the ``{x}`` placeholder). ``backward_model_client`` defaults to ``model``.
    """
    for prompt in prompts:
        x = ChatCompletion.apply(
            model,
            [{"role": "system", "content": [prompt]}, {"role": "user", "content": ["{x}"]}],
            inputs={"x": x},
            backward_model_client=model if backward_model_client is None else backward_model_client,
        )
    return x


def order_questions(count: int) -> tuple[Variable, Variable, Variable]:
    """A batch of ``count`` customer questions, their reference answers and the judge rubric
    comparing the two (``{target}``, ``{prediction}``)."""
    questions = Variable([f"Where is order {i}?" for i in range(count)], role="customer questions")
    targets = Variable([f"Order {i} arrives on Monday." for i in range(count)],
                       role="reference answers")
    rubric = Variable("Reference: {target}\nAnswer: {prediction}\nIs the answer right?",
                      role="judge rubric")
    return questions, targets, rubric
