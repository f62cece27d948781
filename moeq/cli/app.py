"""moeq command line: ``moeq quantize``, ``moeq eval``, ``moeq run``, ``moeq recipes``, ``moeq extract``,
``moeq inspect``, ``moeq methods``."""

from __future__ import annotations

import os

import typer

from moeq.cli import eval as eval_cmd
from moeq.cli import extract as extract_cmd
from moeq.cli import inspect as inspect_cmd
from moeq.cli import methods as methods_cmd
from moeq.cli import quantize as quantize_cmd
from moeq.cli import run as run_cmd
from moeq.cli.common import OneLineGroup

app = typer.Typer(
    name="moeq",
    cls=OneLineGroup,
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    help="Compress Mixture-of-Experts language models and measure what it costs.\n\n"
         "Typical run: [bold]moeq quantize --method int8 -o out/[/] then [bold]moeq eval out/[/].",
)
app.command("quantize")(quantize_cmd.quantize)
app.command("eval")(eval_cmd.evaluate)
app.command("run")(run_cmd.run)
app.command("recipes")(run_cmd.recipes)
app.command("extract")(extract_cmd.extract)
app.command("inspect")(inspect_cmd.inspect)
app.command("methods")(methods_cmd.methods)


def main() -> None:
    quiet_libraries()
    try:
        app()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    exit_now(code)


def exit_now(code) -> None:
    """End the process the way ``sys.exit(code)`` does (atexit handlers, temporary directories' finalizers,
    flushed output), without the interpreter's teardown: it collects and frees torch's, transformers' and their
    imports' object graphs one by one (~1.1 s per command here with the benchmark extra installed) just before
    the OS frees the whole address space anyway. Python threads are waited for first, as at a normal exit."""
    import atexit
    import sys
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import threading
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()  # what Py_Finalize does first: wait for Python threads, join executors' workers
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# what other libraries print on their own (progress bars, notices about optional packages) is not moeq's output
QUIET_LOGGERS = ("transformers", "torchao", "torch.utils._pytree", "accelerate", "huggingface_hub", "datasets")


def quiet_libraries() -> None:
    import logging
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own tqdm bars follow this too
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
