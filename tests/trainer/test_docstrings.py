"""The examples in the trainer package's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "afnio.trainer.cli",
    "afnio.trainer.history",
    "afnio.trainer.loggers",
    "afnio.trainer.metrics",
    "afnio.trainer.recorder",
    "afnio.trainer.report",
    "afnio.trainer.trainer",
    "afnio.utils.viz",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
