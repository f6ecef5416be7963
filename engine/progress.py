"""Progress bars on a terminal, silence elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(label: str, total: int | None = None,
                 enabled: bool = True) -> Iterator[Callable[[int, str], None]]:
    """Yields advance(n, note). With enabled=False (not a TTY, --json) it prints nothing."""
    if not enabled:
        def ignore(n: int, note: str = "") -> None:
            return None

        yield ignore
        return
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed:,}"), TextColumn("{task.fields[note]}"),
               TimeElapsedColumn()]
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(label, total=total, note="")

        def advance(n: int, note: str = "") -> None:
            progress.update(task, advance=n, note=note)

        yield advance
