"""Built-in codecs, one module per layout; ``moeq.registry.load_builtins`` discovers them."""
