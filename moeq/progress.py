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


def describe_fields(fields: dict) -> str:
    """``layer layer.3  read 1.2 MB`` -> ``layer.3  read 1.2 MB``: a value that already says what it is stands alone."""
    return "  ".join(str(v) if str(v).startswith(k) else f"{k} {v}" for k, v in fields.items())


class RichReporter(Reporter):
    """Progress bars on a rich console. A bar stops where its work stopped: an error or Ctrl-C leaves it at the
    count reached (marked "stopped"), only a finished task is shown complete; a task of unknown length is a
    spinner while it runs and a check mark with its time when done."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.table import Column
        self.console = console or Console(stderr=True)
        fixed = {"table_column": Column(no_wrap=True)}
        # the counts and times keep their width; the details (layer, bytes, memory) get what is left of the line
        self.progress = Progress(SpinnerColumn(finished_text="[green]✓"),
                                 TextColumn("[bold]{task.description}", **fixed), BarColumn(bar_width=12),
                                 MofNCompleteColumn(**fixed), TimeElapsedColumn(**fixed), TimeRemainingColumn(**fixed),
                                 TextColumn("{task.fields[info]}",
                                            table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                                 console=self.console, transient=False, expand=True)

    def __enter__(self):
        return self  # the display starts with the first task: an early error prints no empty progress area

    def __exit__(self, *exc):
        if self.progress.live.is_started:
            self.progress.stop()

    @contextmanager
    def task(self, description: str, total: int | None):
        from rich.markup import escape
        description = escape(description)  # may hold a path or a model name: text, not markup
        self.progress.start()  # (once: a no-op when started)
        tid = self.progress.add_task(description, total=total, info="")
        reporter = self

        class _T(Task):
            def advance(self, n: int = 1, **fields):
                info = {"info": escape(describe_fields(fields))} if fields else {}
                reporter.progress.update(tid, advance=n, **info)
        try:
            yield _T()
        except BaseException:
            self.progress.update(tid, description=f"{description} [red](stopped)[/]")
            self.progress.stop_task(tid)
            raise
        t = self.progress.tasks[[x.id for x in self.progress.tasks].index(tid)]
        if t.total is None:  # a spinner: done
            self.progress.update(tid, total=max(t.completed, 1), completed=max(t.completed, 1))
        elif t.completed < t.total:
            self.progress.update(tid, completed=t.total)
        self.progress.stop_task(tid)

    def log(self, message: str) -> None:
        self.progress.console.print(message, markup=False, highlight=False)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (as the OS counts it)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
