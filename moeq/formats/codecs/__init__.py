"""Built-in codecs; importing this package registers them."""

from moeq.formats.codecs import int8_rows  # noqa: F401
