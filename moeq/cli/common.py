"""Shared CLI plumbing: one-line errors with a non-zero exit, consoles, JSON output."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from moeq.errors import MoeqError

console = Console()
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """The one ``error:`` line (text from an artifact or a user is printed as it is, never read as markup)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


class OneLineGroup(TyperGroup):
    """typer's group, but its usage errors (bad option values, unknown options, missing arguments) are the same
    one ``error:`` line and exit code 2 as every other error, not a box."""

    def get_command(self, ctx, cmd_name):
        """Flags are shown as flags in --help (``--weight-only``), without a ``<bool>`` value they do not take."""
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            for p in [*cmd.params, cmd.get_help_option(ctx)]:
                if p is not None and getattr(p, "is_flag", False) and p.metavar is None:
                    p.metavar = ""
        return cmd

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click's UsageError, BadParameter, NoSuchOption ... as typer raises them
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help())
                code = 0
            else:
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                print_error(e.format_message() + hint)
                code = 2
            if not standalone_mode:
                return code
            sys.exit(code)
        except typer.Abort:
            print_error("aborted")
            if not standalone_mode:
                return 1
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a command the way Ctrl-C does: cleanly, saying what was kept


def one_line_errors(fn=None, *, on_interrupt=None):
    """Turn user errors into ``error: ...`` on stderr and exit 2; Ctrl-C and SIGTERM exit 130 saying what was
    kept (``on_interrupt(kwargs) -> str``, else that nothing was written); never a traceback for those."""
    if fn is None:
        return functools.partial(one_line_errors, on_interrupt=on_interrupt)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _sigterm) if main else None
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            what = on_interrupt(kwargs) if on_interrupt else "nothing was written"
            err_console.print(f"[bold red]interrupted:[/] {escape(what)}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except MoeqError as e:
            print_error(str(e))
            raise typer.Exit(e.exit_code) from None
        except MemoryError:
            print_error("out of memory")
            raise typer.Exit(3) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, old)
    return wrapper


def table(title: str | None = None, **kw):
    """The CLI's table style: no vertical rules, one space between columns (reads at 80 columns)."""
    from rich import box
    from rich.table import Table
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left", **kw)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: int) -> str:
    return f"{n:,}" if n < 10**6 else f"{n / 10**6:.2f} M" if n < 10**9 else f"{n / 10**9:.2f} B"


def options_text(opts: dict | None) -> str:
    return " ".join(f"{k}={v}" for k, v in (opts or {}).items())


def write_json(path: Path | None, data) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)
        err_console.print(f"wrote {path}")


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_size(text: str | None) -> int | None:
    """'1.5GB', '800MiB', '4096' (bytes) -> bytes; units are binary (GB = GiB, as accelerate's max_memory)."""
    if text is None:
        return None
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise MoeqError(f"--max-memory {text!r}: expected a positive size such as 800MB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
