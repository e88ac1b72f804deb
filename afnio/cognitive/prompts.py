"""Every prompt the cognitive package sends: the backward prompts of :class:`GradComponent`.

Templates use afnio's one placeholder rule (:func:`afnio.autodiff.feedback.fill_template`):
``{name}`` is filled, every other brace is literal. Each prompt names the role of the variable it
asks about, asks for feedback (never a rewrite) and bounds the answer's length
(``{max_sentences}``, the ``max_feedback_sentences`` setting the LM ops use too). A reply without
its tags is repaired with :data:`afnio.autodiff.prompts.FEEDBACK_FORMAT_CORRECTION`.
"""

from __future__ import annotations

__all__ = [
    "COMPONENT_GRADIENT_PROMPT",
    "COMPONENT_GRADIENT_SYSTEM_PROMPT",
    "COMPONENT_INPUT",
    "COMPONENT_REDUCE_PROMPT",
    "COMPONENT_SAMPLE",
    "COMPONENT_SHARED_INPUTS",
    "COMPONENT_TARGET",
]

COMPONENT_GRADIENT_SYSTEM_PROMPT = (
    "You review one input of a step in a program. The step is a component that turns its inputs "
    "into an output; you see what the component does, its inputs, its output and feedback on "
    "that output. Say how the input under review should change so that the output would earn "
    "better feedback. Give feedback, not a rewritten input, and only about the input under "
    "review. Use at most {max_sentences} sentences. Answer between <FEEDBACK> and </FEEDBACK>; if "
    "the input needs no change, answer <FEEDBACK></FEEDBACK>."
)

COMPONENT_INPUT = "[{name}] ({role})\n{value}"
"""One input of the component, as shown in a gradient prompt."""

COMPONENT_SAMPLE = (
    "<SAMPLE {index}>\n<INPUTS>\n{inputs}\n</INPUTS>\n<OUTPUT>\n{output}\n</OUTPUT>\n"
    "<OUTPUT_FEEDBACK>\n{feedback}\n</OUTPUT_FEEDBACK>\n</SAMPLE {index}>"
)
"""One (inputs, output, feedback) triple of a gradient prompt."""

COMPONENT_SHARED_INPUTS = "<SHARED_INPUTS>\n{inputs}\n</SHARED_INPUTS>"
"""The inputs that are the same in every sample, shown once before the samples."""

COMPONENT_TARGET = "Input under review: [{name}] ({role}{kind})\n<VALUE>\n{value}\n</VALUE>"
"""The input the feedback is for."""

COMPONENT_GRADIENT_PROMPT = (
    "Component: {component}\nWhat it does: {description}\nIts output is the {output_role}.\n\n"
    "{samples}\n\n{target}\n\n"
    "How should the input under review change so that the output earns better feedback?"
)
"""The user message of one gradient request; ``samples`` holds one or more samples."""

COMPONENT_REDUCE_PROMPT = (
    "Reviewers each read a different part of a batch and wrote feedback on the same input, the "
    "{role}. Merge their feedback into one: keep every distinct point, drop repetitions and add "
    "nothing new.\n\n{parts}"
)
"""The user message that merges chunk feedback on one input into one gradient."""
