"""moeq: compress (Mixture-of-Experts) language models and measure what it costs and buys."""

__version__ = "0.1.0"
