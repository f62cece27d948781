"""Meta-test: every registered method and codec has its conformance subclass somewhere under tests/."""

import importlib
import pkgutil

import tests
from moeq.registry import CODECS, QUANTIZERS, load_builtins
from tests.conformance import CodecConformance, QuantizerConformance


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_registered_name_has_a_conformance_suite():
    load_builtins()
    for m in pkgutil.iter_modules(tests.__path__):
        if m.name.startswith("test_"):
            importlib.import_module(f"tests.{m.name}")
    codecs = {c.codec.name for c in _all_subclasses(CodecConformance) if c.codec is not None}
    methods = {c.quantizer.name for c in _all_subclasses(QuantizerConformance) if c.quantizer is not None}
    assert set(CODECS) <= codecs, set(CODECS) - codecs
    assert set(QUANTIZERS) <= methods, set(QUANTIZERS) - methods
