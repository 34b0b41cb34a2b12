"""Human output on stderr: the rich console and the progress bar (a terminal only).

Kept apart from the training loop so that every layer can print without importing it.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# Logs of batch jobs get wide tables instead of rich's 80-column default.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)
