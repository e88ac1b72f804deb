"""Every prompt the autodiff package sends or writes.

Templates use afnio's placeholder rule: ``{name}`` is filled, every other brace is literal (see
:func:`afnio.autodiff.feedback.fill_template`). Each prompt names the role of the variable it
asks about, asks for *feedback* (never a rewrite) and bounds the answer's length
(``{max_sentences}``, the ``max_feedback_sentences`` setting).
"""

from __future__ import annotations

__all__ = [
    "CONDENSE_OUTPUT_FEEDBACK_PROMPT",
    "CONVERSATION_MESSAGE",
    "DETERMINISTIC_EXPLANATION",
    "DETERMINISTIC_FAILURE",
    "DETERMINISTIC_SUCCESS",
    "ELEMENT_GRADIENT_PROMPT",
    "FEEDBACK_FORMAT_CORRECTION",
    "GRADIENT_SYSTEM_PROMPT",
    "JUDGE_FORMAT_CORRECTION",
    "JUDGE_FORMAT_INSTRUCTION",
    "MARKED_VARIABLE",
    "REDUCE_GRADIENT_PROMPT",
    "REDUCE_PART",
    "SHARED_GRADIENT_PROMPT",
    "SHARED_SAMPLE",
    "SHARED_SAMPLE_VALUE",
    "VARYING_PART",
    "VARYING_PART_WITH_VARIABLE",
]

# --------------------------------------------------------------------------- gradients
GRADIENT_SYSTEM_PROMPT = (
    "You review one variable of a program built from language-model calls. You see the messages "
    "sent to a model, with that variable marked <VARIABLE>...</VARIABLE>, the model's output and "
    "feedback on it. Say how the marked variable should change for the output to earn better "
    "feedback: feedback on that variable only, not a rewrite of it. If it needs no change, "
    "answer <FEEDBACK></FEEDBACK>."
)
"""The system message of every gradient request; each request's own prompt bounds the answer
(``{max_sentences}``) and names its tags."""

MARKED_VARIABLE = "<VARIABLE>{text}</VARIABLE>"
"""How the variable under review is marked inside the rendered conversation."""

CONVERSATION_MESSAGE = "[{role} message]\n{content}"
"""One message of a rendered conversation."""

VARYING_PART = "[{label}: differs per sample, see the samples]"
"""A part of a conversation template that takes a different value in each sample."""

VARYING_PART_WITH_VARIABLE = (
    "[{label}: differs per sample and contains the marked variable, see the samples]"
)
"""A varying part into which the variable under review is filled."""

ELEMENT_GRADIENT_PROMPT = (
    "<CONVERSATION>\n{conversation}\n</CONVERSATION>\n\n"
    '<OUTPUT role="{output_role}">\n{output}\n</OUTPUT>\n\n'
    "<OUTPUT_FEEDBACK>\n{feedback}\n</OUTPUT_FEEDBACK>\n\n"
    "The marked variable is the {variable_role}; it is {location}. How should it change, given "
    "the feedback on the output? Answer in at most {max_sentences} sentences between <FEEDBACK> "
    "and </FEEDBACK>."
)

SHARED_SAMPLE_VALUE = '<VALUE of="{label}">\n{text}\n</VALUE>'

SHARED_SAMPLE = (
    '<SAMPLE number="{number}">\n{values}\n'
    "<OUTPUT>\n{output}\n</OUTPUT>\n"
    "<OUTPUT_FEEDBACK>\n{feedback}\n</OUTPUT_FEEDBACK>\n</SAMPLE>"
)

SHARED_GRADIENT_PROMPT = (
    "This conversation was sent once per sample of a batch of {batch_size}; parts that differ "
    "per sample are in square brackets.\n\n"
    "<CONVERSATION>\n{conversation}\n</CONVERSATION>\n\n"
    "The marked variable is the {variable_role}; it is {location}. It is shared by every sample. "
    'Below are the {count} samples whose output ("{output_role}") received feedback.\n\n'
    "{samples}\n\n"
    "How should the shared variable change, given this feedback? Address the problems that "
    "matter across samples, not one sample at a time. Answer in at most {max_sentences} "
    "sentences between <FEEDBACK> and </FEEDBACK>."
)

REDUCE_PART = '<FEEDBACK_PART number="{number}">\n{text}\n</FEEDBACK_PART>'

REDUCE_GRADIENT_PROMPT = (
    "Reviewers each read a different part of a batch and wrote feedback on the same variable, "
    "the {variable_role}. Merge their feedback into one: keep every distinct point, drop "
    "repetitions, and add nothing new. Answer in at most {max_sentences} sentences between "
    "<FEEDBACK> and </FEEDBACK>.\n\n{parts}"
)

CONDENSE_OUTPUT_FEEDBACK_PROMPT = (
    "Several pieces of feedback were given on the same output, the {output_role}. Merge them "
    "into one feedback on that output: keep every distinct point, drop repetitions, and add "
    "nothing new. Answer in at most {max_sentences} sentences between <FEEDBACK> and "
    "</FEEDBACK>.\n\n{parts}"
)
"""Used only when feedback on one output is too long for a gradient prompt's token budget."""

FEEDBACK_FORMAT_CORRECTION = (
    "Your reply could not be read: {reason}. Answer again with the feedback between <FEEDBACK> "
    "and </FEEDBACK>, in at most {max_sentences} sentences."
)
"""Sent (with the unreadable reply) to repair a feedback reply; used by every feedback request."""

# --------------------------------------------------------------------------- evaluators
JUDGE_FORMAT_INSTRUCTION = (
    "Reply with one JSON object and nothing else: "
    '{"score": <number>, "explanation": "<why this score, in at most {max_sentences} '
    'sentences>"}'
)
"""Appended to the last user message of an :class:`~afnio.autodiff.evaluator.LMJudgeEvaluator`."""

JUDGE_FORMAT_CORRECTION = (
    'Your reply could not be read: {reason}. Reply with one JSON object: {"score": <number>, '
    '"explanation": "<at most {max_sentences} sentences>"}, and nothing else.'
)

DETERMINISTIC_EXPLANATION = (
    "Compared with the {target_role} {target}, the {prediction_role} {prediction} gets a score "
    "of {score} from {eval_fn_purpose}.{verdict}"
)
"""The explanation a :class:`~afnio.autodiff.evaluator.DeterministicEvaluator` writes per sample."""

DETERMINISTIC_SUCCESS = " This counts as a success."
DETERMINISTIC_FAILURE = " This does not count as a success."
