from __future__ import annotations

from rich.table import Table

from moeq.cli.common import console, one_line_errors


@one_line_errors
def methods():
    """List the registered quantization methods (with their options) and codecs."""
    from moeq.registry import CODECS, QUANTIZERS, load_builtins
    load_builtins()
    t = Table(title="methods")
    for c in ("method", "codec", "option", "default", "meaning"):
        t.add_column(c)
    for name, q in QUANTIZERS.items():
        first = True
        for opt, f in q.Config.model_fields.items():
            t.add_row(name if first else "", q.codec if first else "", opt, repr(f.default), f.description or "")
            first = False
    console.print(t)
    c = Table(title="codecs")
    for col in ("codec", "version", "reads versions", "layout"):
        c.add_column(col)
    for name, cls in CODECS.items():
        doc = (cls.__module__ and __import__(cls.__module__, fromlist=["x"]).__doc__ or "").strip().splitlines()
        c.add_row(name, str(cls.version), ", ".join(map(str, cls.readable_versions)), doc[0] if doc else "")
    console.print(c)
