from __future__ import annotations

import re

from rich.markup import escape

from moeq.cli.common import console, one_line_errors, table


def plain(rst: str) -> str:
    """A docstring line as terminal text: ``code`` and `ref` quoting dropped, *emphasis* markers too."""
    text = re.sub(r"``([^`]+)``", r"\1", rst)
    text = re.sub(r":\w+:`([^`]+)`", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    return re.sub(r"\*\*?([^*]+)\*\*?", r"\1", text)


def yaml_value(v) -> str:
    """A default as a recipe (YAML) or ``-O key=value`` writes it: true / false / null, strings unquoted."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def codec_summary(cls) -> str:
    """The codec module's first docstring paragraph, unwrapped and rendered (``int8-rows`` v1: ...)."""
    import sys
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    return plain(" ".join(line.strip() for line in doc.splitlines()))


@one_line_errors
def methods():
    """List the registered quantization methods, their options and the codecs.

    Options are written as -O key=value takes them, or as a recipe's options."""
    from moeq.registry import CODECS, QUANTIZERS, load_builtins
    load_builtins()
    for name, q in QUANTIZERS.items():
        t = table(f"[bold]{escape(name)}[/]  (codec {escape(q.codec)})")
        t.add_column("option", no_wrap=True)
        t.add_column("default", no_wrap=True)
        t.add_column("meaning")
        for opt, f in q.Config.model_fields.items():
            t.add_row(opt, escape(yaml_value(f.default)), escape(plain(f.description or "")))
        console.print(t)
    c = table("[bold]codecs[/]")
    c.add_column("codec", no_wrap=True)
    c.add_column("version", justify="right")
    c.add_column("reads", justify="right")
    c.add_column("layout")
    for name, cls in CODECS.items():
        c.add_row(escape(name), str(cls.version), ", ".join(map(str, cls.readable_versions)),
                  escape(codec_summary(cls)))
    console.print(c)
