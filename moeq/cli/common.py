"""Shared CLI plumbing: one-line errors with a non-zero exit, consoles, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from moeq.errors import MoeqError

console = Console()
err_console = Console(stderr=True)


def one_line_errors(fn):
    """Turn user errors into ``error: ...`` on stderr and exit 2; Ctrl-C exits 130; never a traceback for those."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoeqError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/] (no partial output was left)")
            raise typer.Exit(130) from None
        except MemoryError:
            err_console.print("[bold red]error:[/] out of memory")
            raise typer.Exit(3) from None
    return wrapper


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
