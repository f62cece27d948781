"""One tiny registry type. ``QUANTIZERS`` (method name -> Quantizer class), ``CODECS`` (codec name -> Codec
class) and ``RUNTIMES`` (codec name -> ``factory(q: QTensor, bias) -> nn.Module``) are its instances; the codec
registry is the only allow-list a loader consults (never a second hand-kept list, never code named by a file)."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self):
        return sorted(self._items.items())


QUANTIZERS: Registry = Registry("method")
CODECS: Registry = Registry("codec")
RUNTIMES: Registry = Registry("runtime")

# packages whose modules register built-in methods, codecs and runtimes when imported
BUILTIN_PACKAGES = ("moeq.quant", "moeq.formats.codecs", "moeq.runtime")
_loaded = False


def load_builtins() -> None:
    """Import every module of the built-in packages (they register themselves): discovered, not listed by hand.
    Called lazily, never at import."""
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil
    for pkg_name in BUILTIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg_name}.{mod.name}")
    _loaded = True
