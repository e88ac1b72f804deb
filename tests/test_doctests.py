"""Every docstring example in the afnio package runs, as part of ``python -m pytest tests``.

Each module's examples are found with :class:`doctest.DocTestFinder` and run in the module's own
namespace (as ``pytest --doctest-modules`` would), one test per module, with ``ELLIPSIS``.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import afnio

MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(afnio.__path__, "afnio."))


def test_every_module_is_collected():
    assert "afnio.autodiff.engine" in MODULES and "afnio.testing.turnstile" in MODULES
    assert len(MODULES) > 50


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test, out=report.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} failing example(s) in {name}:\n{report.getvalue()}"
