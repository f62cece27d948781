"""Progress reporting for long steps. The API takes a ``Reporter``; the CLI passes a rich-backed one."""

from __future__ import annotations

from contextlib import contextmanager


class Task:
    def advance(self, n: int = 1, **fields) -> None:  # fields: extra columns such as bytes written
        pass


class Reporter:
    """Silent by default."""

    @contextmanager
    def task(self, description: str, total: int | None):
        yield Task()

    def log(self, message: str) -> None:
        pass


class RichReporter(Reporter):
    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        self.console = console or Console(stderr=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=self.console, transient=False)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    @contextmanager
    def task(self, description: str, total: int | None):
        tid = self.progress.add_task(description, total=total, info="")
        reporter = self

        class _T(Task):
            def advance(self, n: int = 1, **fields):
                info = "  ".join(f"{k} {v}" for k, v in fields.items())
                reporter.progress.update(tid, advance=n, **({"info": info} if fields else {}))
        try:
            yield _T()
        finally:
            t = self.progress.tasks[[x.id for x in self.progress.tasks].index(tid)]
            if t.total is not None and t.completed < t.total:
                self.progress.update(tid, completed=t.total)

    def log(self, message: str) -> None:
        self.progress.console.print(message)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (as the OS counts it)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
