"""The Trainer's console output: a ``rich`` progress bar with metrics, cost and tokens.

On a terminal the bar updates live; when output is not a terminal (CI, a pipe, a log file) rich
prints each bar once, in its final state, so logs stay readable. Summary lines and messages are
printed in both cases.
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from afnio.models.usage import Usage

__all__ = ["ProgressReporter", "format_metrics", "format_usage"]


def format_usage(usage: Usage) -> str:
    """``$0.0123 · 1,234 tok`` (plus cached tokens when there are any).

    Example:
        >>> format_usage(Usage(prompt_tokens=1000, completion_tokens=234, cost_usd=0.0123))
        '$0.0123 · 1,234 tok'
    """
    text = f"${usage.cost_usd:.4f} · {usage.total_tokens:,} tok"
    if usage.cached_tokens:
        text += f" ({usage.cached_tokens:,} cached)"
    return text


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``train_score=0.750 val_score=0.800`` with three decimals.

    Example:
        >>> format_metrics({"train_score": 0.75})
        'train_score=0.750'
    """
    return " ".join(f"{name}={value:.3f}" for name, value in metrics.items())


class ProgressReporter:
    """One progress bar per stage (training epoch, validation, test, predict) and messages.

    Args:
        enabled: ``False`` prints nothing at all.
        console: Where to print (a new stdout :class:`rich.console.Console` by default).
    """

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console if console is not None else Console()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        """Open a bar for a stage with ``total`` batches (``None`` if unknown)."""
        self.stop()
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")
        self._progress.start()

    def update(
        self,
        completed: int,
        metrics: Mapping[str, float],
        usage: Usage,
        proposals: Mapping[str, int] | None = None,
    ) -> None:
        """Show ``completed`` batches, the running metrics, the epoch's ``accepted`` and
        ``rejected`` proposals (when given) and the run's usage so far."""
        if self._progress is None or self._task is None:
            return
        counts = (
            f"accepted {proposals['accepted']} · rejected {proposals['rejected']}"
            if proposals else ""
        )
        info = " · ".join(
            part for part in (format_metrics(metrics), counts, format_usage(usage)) if part
        )
        self._progress.update(self._task, completed=completed, info=info)

    def stop(self) -> None:
        """Close the current bar (it stays on screen in its final state)."""
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None

    def print(self, text: str) -> None:
        """Print a line (above a live bar, if one is showing)."""
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
