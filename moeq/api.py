"""The Python API, a thin facade: ``quantize``, ``load``, ``evaluate`` (``evaluate_many``: several models against
one baseline), ``run`` (a whole recipe: quantize, evaluate, check its ``expect``), ``inspect``, ``extract``. The CLI
calls nothing else.

Where the work happens: the run (plan, layer-by-layer phases, resume, workers) in ``moeq.pipeline``, the manifest
schema in ``moeq.formats.manifest``, runtime modules in ``moeq.runtime.build``, loading in ``moeq.runtime.load``,
evaluation in ``moeq.pipeline.evaluate`` (metrics in ``moeq.eval``), inspection in ``moeq.formats.inspect``,
extraction of fewer widths from a nested-precision artifact (one, or a width per expert under a budget) in
``moeq.pipeline.extract``."""

from moeq.formats.inspect import inspect
from moeq.pipeline.evaluate import evaluate, evaluate_many, split_bits
from moeq.pipeline.evaluate import run_recipe as run
from moeq.pipeline.extract import extract_artifact as extract
from moeq.pipeline.quantize import calibration_ids, quantize, quantize_model
from moeq.progress import peak_rss_mb
from moeq.runtime.load import is_artifact, load, load_any

__all__ = ["quantize", "quantize_model", "calibration_ids", "load", "load_any", "is_artifact", "evaluate",
           "evaluate_many", "split_bits", "run",
           "inspect", "extract", "peak_rss_mb"]
