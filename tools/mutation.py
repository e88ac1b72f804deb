"""Mutation testing of one afnio module with cosmic-ray: kill rate and surviving mutants.

Each mutant is one small change to the module (``<`` for ``<=``, ``not`` added, a loop that
never runs, a number changed, ...). The module's own tests run against every mutant; a mutant
the tests still pass is a *survivor*: either the tests miss a behaviour, or the change makes no
observable difference (an *equivalent* mutant). Not part of CI (it takes minutes per module).

Usage::

    python tools/mutation.py afnio/autodiff/engine.py              # the module's default tests
    python tools/mutation.py afnio/optim/tgd.py --tests tests/optim --workers 2
    python tools/mutation.py afnio/autodiff/graph.py --session graph.sqlite   # keep results
    python tools/mutation.py afnio/autodiff/graph.py --session graph.sqlite --rerun-survivors
    python tools/mutation.py afnio/autodiff/lm_ops.py --sample 150 --seed 1   # an estimate

The project (``afnio/``, ``tests/`` and the pytest configuration) is copied into one scratch
directory per worker, so the working tree is never touched and several runs can go at once.
Mutations inside type annotations are skipped: with ``from __future__ import annotations`` they
are never evaluated, so they could only survive. The tests run as CI runs them
(``CI=true HYPOTHESIS_PROFILE=ci``, stopping at the first failure). The session file is a
cosmic-ray work database, so ``cr-report`` and ``cr-html`` read it too. After tests were added
for the survivors, ``--rerun-survivors`` runs only those mutants again and updates the session
(a killed mutant stays killed when tests are only added).

Example:
    >>> sorted(DEFAULT_TESTS)[:2]
    ['afnio/autodiff/engine.py', 'afnio/autodiff/evaluator.py']
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import Manager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _doctests(module: str) -> str:
    """The pytest id of ``module``'s docstring examples (``tests/test_doctests.py``)."""
    return f"tests/test_doctests.py::test_docstring_examples_run[{module}]"


DEFAULT_TESTS: dict[str, list[str]] = {
    "afnio/autodiff/engine.py": [
        "tests/autodiff/test_engine.py",
        "tests/autodiff/test_engine_properties.py",
        "tests/autodiff/test_function.py",
        "tests/autodiff/test_basic_ops.py",
    ],
    "afnio/autodiff/graph.py": [
        "tests/autodiff/test_graph.py",
        "tests/autodiff/test_engine.py",
        "tests/autodiff/test_engine_properties.py",
        "tests/autodiff/test_function.py",
        "tests/autodiff/test_basic_ops.py",
        "tests/autodiff/test_variable.py",
    ],
    "afnio/autodiff/function.py": [
        "tests/autodiff/test_function.py",
        "tests/autodiff/test_engine.py",
        "tests/autodiff/test_engine_properties.py",
        "tests/autodiff/test_basic_ops.py",
        "tests/autodiff/test_grad_mode.py",
    ],
    "afnio/autodiff/feedback.py": [
        _doctests("afnio.autodiff.feedback"),
        "tests/autodiff/test_feedback.py",
        "tests/autodiff/test_feedback_budgets.py",
        "tests/autodiff/test_lm_ops.py",
        "tests/autodiff/test_fitting.py",
        "tests/autodiff/test_lm_ops_routing.py",
        "tests/autodiff/test_evaluator.py",
        "tests/cognitive/test_grad_component.py",
        "tests/optim/test_tgd.py",
    ],
    "afnio/autodiff/lm_ops.py": [
        _doctests("afnio.autodiff.lm_ops"),
        "tests/autodiff/test_lm_ops.py",
        "tests/autodiff/test_lm_ops_prompts.py",
        "tests/autodiff/test_lm_ops_properties.py",
        "tests/autodiff/test_lm_ops_routing.py",
        "tests/autodiff/test_fitting.py",
        "tests/autodiff/test_evaluator.py",
        "tests/autodiff/test_evaluator_routing.py",
        "tests/cognitive/test_functional_and_ops.py",
    ],
    "afnio/autodiff/evaluator.py": [
        _doctests("afnio.autodiff.evaluator"),
        "tests/autodiff/test_evaluator.py",
        "tests/autodiff/test_evaluator_routing.py",
        "tests/cognitive/test_functional_and_ops.py",
    ],
    "afnio/cognitive/modules/grad_component.py": [
        _doctests("afnio.cognitive.modules.grad_component"),
        "tests/cognitive/test_grad_component.py",
        "tests/cognitive/test_grad_component_routing.py",
        "tests/cognitive/test_module_hooks.py",
    ],
    "afnio/optim/tgd.py": [
        _doctests("afnio.optim.tgd"),
        "tests/optim/test_tgd.py",
        "tests/optim/test_tgd_properties.py",
        "tests/optim/test_tgd_routing.py",
        "tests/optim/test_optimizer.py",
        "tests/optim/test_training_loop.py",
    ],
}
"""Tests run against each module's mutants when ``--tests`` is not given."""

_COPIED = ("afnio", "tests", "setup.cfg", "pyproject.toml")
_IGNORED = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc", ".pytest_cache")


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``((line, col), (end_line, end_col))`` of every annotation in ``source``.

    Example:
        >>> annotation_spans("def f(x: int | None) -> str: ...")
        [((1, 24), (1, 27)), ((1, 9), (1, 19))]
    """
    spans = []
    for node in ast.walk(ast.parse(source)):
        annotations: list[ast.expr | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations.append(node.returns)
            for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
                annotations.append(arg.annotation if arg is not None else None)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is not None:
                spans.append(
                    ((annotation.lineno, annotation.col_offset),
                     (annotation.end_lineno or annotation.lineno, annotation.end_col_offset or 0))
                )
    return spans


def _in_spans(position: Sequence[int], spans: Iterable[tuple[tuple[int, int], tuple[int, int]]]):
    point = (position[0], position[1])
    return any(start <= point < end for start, end in spans)


def _copy_project(destination: Path) -> None:
    destination.mkdir(parents=True)
    for name in _COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=_IGNORED)
        elif source.exists():
            shutil.copy2(source, destination / name)


def _test_command(tests: Sequence[str]) -> str:
    return shlex.join(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    )


# --------------------------------------------------------------------------- worker processes
def _init_worker(directories: Any) -> None:
    """Each worker process takes its own copy of the project and works inside it."""
    directory = directories.get()
    os.chdir(directory)
    os.environ["PYTHONPATH"] = directory
    os.environ["CI"] = "true"
    os.environ["HYPOTHESIS_PROFILE"] = "ci"


def _run_job(job_id: str, mutations: list, test_command: str, timeout: float) -> tuple:
    from cosmic_ray.mutating import mutate_and_test

    return job_id, mutate_and_test(mutations, test_command, timeout)


# --------------------------------------------------------------------------- the run
def _baseline(directory: Path, test_command: str) -> float:
    env = dict(os.environ, CI="true", HYPOTHESIS_PROFILE="ci", PYTHONPATH=str(directory),
               PYTHONDONTWRITEBYTECODE="1")
    started = time.monotonic()
    done = subprocess.run(shlex.split(test_command), cwd=directory, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"mutation: the tests fail without any mutation:\n{done.stdout[-3000:]}")
    return time.monotonic() - started


def _work_items(module: str, directory: Path, exclude: Sequence[str]) -> tuple[list, int]:
    """cosmic-ray's work items for ``module`` (a path relative to the project root), minus
    mutations inside annotations and of excluded operators; also how many were dropped."""
    init = importlib.import_module("cosmic_ray.commands.init")
    previous = Path.cwd()
    os.chdir(directory)
    try:
        items = list(init._all_work_items([Path(module)], {}))
        spans = annotation_spans((directory / module).read_text())
    finally:
        os.chdir(previous)
    patterns = [re.compile(pattern) for pattern in exclude]
    kept = [
        item for item in items
        if not _in_spans(item.mutations[0].start_pos, spans)
        and not any(p.search(item.mutations[0].operator_name) for p in patterns)
    ]
    return kept, len(items) - len(kept)


def _earlier_survivors(session: Path, module: str) -> list:
    """The work items of ``session`` whose mutant survived (they must mutate ``module``)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome

    with use_db(str(session), WorkDB.Mode.open) as db:
        done = db.completed_work_items
    modules = {item.mutations[0].module_path.as_posix() for item, _ in done}
    if modules - {module}:
        sys.exit(f"mutation: {session} holds mutants of {sorted(modules)}, not of {module}")
    return [item for item, result in done if result.test_outcome == TestOutcome.SURVIVED]


def main(argv: Sequence[str] | None = None) -> int:
    """Mutate one module, run its tests against every mutant, print the kill rate and survivors.

    Returns:
        0 when every mutant was killed, 1 when some survived.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the module to mutate, e.g. afnio/autodiff/engine.py")
    parser.add_argument("--tests", nargs="+", help="test files or directories to run "
                        "(default: the module's entry in DEFAULT_TESTS)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)),
                        help="test runs at once (default: the number of CPUs)")
    parser.add_argument("--timeout", type=float, help="seconds per test run before the mutant "
                        "counts as killed (default: 4 x the unmutated run, at least 60)")
    parser.add_argument("--session", help="cosmic-ray session file to keep the results in")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run only the mutants that survived in --session (after tests were "
                        "added) and update their results there; the kill rate printed is the "
                        "session's")
    parser.add_argument("--exclude-operator", action="append", default=[],
                        help="regex of cosmic-ray operator names to leave out (repeatable)")
    parser.add_argument("--limit", type=int, help="run only the first N mutants (a smoke run)")
    parser.add_argument("--sample", type=int, help="run a random sample of N mutants (seeded by "
                        "--seed; the kill rate is then an estimate for the whole module)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    args = parser.parse_args(argv)

    module = Path(args.module).resolve().relative_to(ROOT).as_posix()
    tests = args.tests or DEFAULT_TESTS.get(module)
    if not tests:
        parser.error(f"no default tests for {module}; give --tests")
    if args.rerun_survivors and not (args.session and Path(args.session).exists()):
        parser.error("--rerun-survivors needs --session naming an earlier run's session file")
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome

    scratch = Path(tempfile.mkdtemp(prefix="afnio-mutation-"))
    try:
        copies = [scratch / f"worker{i}" for i in range(args.workers)]
        for copy in copies:
            _copy_project(copy)
        command = _test_command(tests)
        baseline = _baseline(copies[0], command)
        timeout = args.timeout or max(60.0, 4 * baseline)
        if args.rerun_survivors:
            items, skipped = _earlier_survivors(Path(args.session), module), 0
            what = "earlier survivors"
        else:
            items, skipped = _work_items(module, copies[0], args.exclude_operator)
            what = f"mutants ({skipped} in annotations or excluded)"
        if args.sample and args.sample < len(items):
            items = random.Random(args.seed).sample(items, args.sample)
            what += f", a sample of {args.sample} (seed {args.seed})"
        if args.limit:
            items = items[: args.limit]
        print(f"{module}: {len(items)} {what}, tests {' '.join(tests)}; unmutated run "
              f"{baseline:.1f}s, timeout {timeout:.0f}s, {args.workers} worker(s)", flush=True)
        session = Path(args.session) if args.session else scratch / "session.sqlite"
        mode = WorkDB.Mode.open if args.rerun_survivors else WorkDB.Mode.create
        outcomes: Counter[str] = Counter()
        started = time.monotonic()
        with use_db(str(session), mode) as db, Manager() as manager:
            if not args.rerun_survivors:
                db.clear()
                db.add_work_items(items)
            queue = manager.Queue()
            for copy in copies:
                queue.put(str(copy))
            with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                                     initargs=(queue,)) as pool:
                futures = [
                    pool.submit(_run_job, item.job_id, list(item.mutations), command, timeout)
                    for item in items
                ]
                for done, future in enumerate(as_completed(futures), 1):
                    job_id, result = future.result()
                    db.set_result(job_id, result)
                    outcome = result.test_outcome or result.worker_outcome
                    outcomes[outcome.value] += 1
                    if done % 20 == 0 or done == len(items):
                        print(f"  {done}/{len(items)} done, {outcomes['killed']} killed, "
                              f"{outcomes['survived']} survived "
                              f"({time.monotonic() - started:.0f}s)", flush=True)
            results = db.completed_work_items
        totals = Counter(
            (result.test_outcome or result.worker_outcome).value for _, result in results
        )
        survivors = [(item, result) for item, result in results
                     if result.test_outcome == TestOutcome.SURVIVED]
        killed, survived = totals["killed"], totals["survived"]
        tested = killed + survived
        rate = 100.0 * killed / tested if tested else 100.0
        others = {k: v for k, v in totals.items() if k not in ("killed", "survived")}
        if args.rerun_survivors:
            print(f"\n{outcomes['killed']} of {len(items)} earlier survivors killed now")
        print(f"\n{module}: {killed} of {tested} mutants killed ({rate:.1f}%); "
              f"other outcomes: {others or 'none'}")
        for item, result in sorted(survivors, key=lambda s: tuple(s[0].mutations[0].start_pos)):
            mutation = item.mutations[0]
            line = mutation.start_pos[0]
            print(f"\nSURVIVED {module}:{line} in {mutation.definition_name or '<module>'} "
                  f"[{mutation.operator_name} #{mutation.occurrence}]")
            print(_short_diff(result.diff))
        if args.session:
            print(f"\nsession kept in {session} (read it with cr-report / cr-html)")
        return 1 if survivors else 0
    finally:
        shutil.rmtree(scratch)


def _short_diff(diff: str | None) -> str:
    lines = [line for line in (diff or "").splitlines()
             if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
    return "\n".join(f"    {line}" for line in lines)


if __name__ == "__main__":
    sys.exit(main())
