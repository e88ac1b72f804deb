"""Griffe extension for the docs build, adapting two conventions of afnio's docstrings.

1. afnio's Google-style docstrings head their doctests with a singular ``Example:``. Griffe
   renders that heading as a plain admonition, whose ``>>>`` lines would be read as Markdown;
   renaming it to ``Examples:`` makes Griffe split the section into prose and code blocks.
2. A :class:`afnio.autodiff.Function` subclass is never instantiated: its class docstring's
   ``Args``/``Returns`` describe ``Cls.apply(...)``, whose signature is ``forward``'s, not the
   class's. Griffe would check them against the class signature, so they are not checked there.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_FUNCTION = "afnio.autodiff.function.Function"


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` headings; don't check a Function subclass's ``apply`` arguments."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
        if obj.is_class and any(base.path == _FUNCTION for base in obj.mro()):
            obj.docstring.parser_options = {
                **obj.docstring.parser_options,
                "warn_unknown_params": False,
                "warn_missing_types": False,
            }
