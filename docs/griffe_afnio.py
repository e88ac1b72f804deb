"""Griffe extension for the docs build, adapting three conventions of afnio's docstrings.

1. afnio's Google-style docstrings head their doctests with a singular ``Example:``. Griffe
   renders that heading as a plain admonition, whose ``>>>`` lines would be read as Markdown;
   renaming it to ``Examples:`` makes Griffe split the section into prose and code blocks.
2. Cross-references are written in Sphinx's style (``:class:`~afnio.models.Usage```). They become
   optional autorefs: a link when the target is documented, plain code otherwise. Short names
   are resolved in the scope of the object whose docstring holds them.
3. A :class:`afnio.autodiff.Function` subclass is never instantiated: its class docstring's
   ``Args``/``Returns`` describe ``Cls.apply(...)``, whose signature is ``forward``'s, not the
   class's. Griffe would check them against the class signature, so they are not checked there.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):`([^`]+)`")
_FUNCTION = "afnio.autodiff.function.Function"


def _target_path(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj`` (``target`` itself if out of scope)."""
    if target.startswith("afnio."):
        return target
    head, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        if head in scope.members:
            found = scope.members[head].path
            return f"{found}.{rest}" if rest else found
        scope = scope.parent
    try:
        found = obj.resolve(head)
    except griffe.NameResolutionError:
        return target
    return f"{found}.{rest}" if rest else found


def _autoref(obj: griffe.Object, match: re.Match[str]) -> str:
    text = match.group(1).strip()
    short = text.startswith("~")
    target = text.lstrip("~.")
    title = target.rsplit(".", 1)[-1] if short else target
    path = _target_path(obj, target)
    return (
        f'<autoref identifier="{html.escape(path)}" optional>'
        f"<code>{html.escape(title)}</code></autoref>"
    )


class AfnioDocstrings(griffe.Extension):
    """Rename ``Example:`` headings, turn Sphinx roles into autorefs, and don't check a Function
    subclass's ``apply`` arguments against the class signature."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _adapt(obj)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        # The top-level package is not passed to on_object.
        _adapt(pkg)


def _adapt(obj: griffe.Object) -> None:
    """Apply the three adaptations to ``obj``'s docstring (idempotent)."""
    if obj.docstring is None:
        return
    text = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
    obj.docstring.value = _SPHINX_ROLE.sub(lambda match: _autoref(obj, match), text)
    if obj.is_class and any(base.path == _FUNCTION for base in obj.mro()):
        obj.docstring.parser_options = {
            **obj.docstring.parser_options,
            "warn_unknown_params": False,
            "warn_missing_types": False,
        }
