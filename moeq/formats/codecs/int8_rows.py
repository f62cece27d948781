"""``int8-rows`` v1: LLM.int8 weights.

parts                     dtype          shape
  qweight                 int8           [out, in]   row-major codes, w ~= qweight * scale[:, None] / smooth
  scale                   float32        [out]       per-row absmax / 127
  smooth      (optional)  float32        [in]        SmoothQuant scales folded into the columns
  outlier_idx (optional)  int32          [k]         systematic outlier features, ascending
  outlier_w   (optional)  float16|bf16   [out, k]    their exact 16-bit weight columns (qweight column is 0)
meta: mode ("w8a8" | "weight_only"), threshold (float), act_group (int)
"""

from __future__ import annotations

import math

import torch

from moeq.formats.codec import Codec
from moeq.quant.base import QTensor
from moeq.registry import CODECS

_OPTIONAL = ("smooth", "outlier_idx", "outlier_w")


@CODECS.register("int8-rows")
class Int8RowsCodec(Codec):
    name = "int8-rows"
    version = 1
    readable_versions = (1,)

    def encode(self, q: QTensor, shared=None):
        parts = {k: v.contiguous() for k, v in q.tensors.items()}
        meta = {"mode": q.meta["mode"], "threshold": float(q.meta["threshold"]), "act_group": int(q.meta["act_group"])}
        return parts, meta

    def decode(self, parts, meta, shape, version, shared=None):
        out_f, in_f = shape
        e = self.expect
        e(set(parts) >= {"qweight", "scale"} and set(parts) <= {"qweight", "scale", *_OPTIONAL}, f"parts {sorted(parts)}")
        e(parts["qweight"].dtype == torch.int8 and tuple(parts["qweight"].shape) == (out_f, in_f), "qweight shape/dtype")
        e(tuple(parts["scale"].shape) == (out_f,) and parts["scale"].is_floating_point(), "scale shape/dtype")
        if "smooth" in parts:
            e(tuple(parts["smooth"].shape) == (in_f,) and parts["smooth"].is_floating_point(), "smooth shape/dtype")
        e(("outlier_idx" in parts) == ("outlier_w" in parts), "outlier_idx without outlier_w")
        if "outlier_idx" in parts:
            k = parts["outlier_idx"].numel()
            e(tuple(parts["outlier_w"].shape) == (out_f, k) and parts["outlier_w"].is_floating_point(),
              "outlier_w shape/dtype")
            e(parts["outlier_idx"].dtype in (torch.int32, torch.int64) and parts["outlier_idx"].dim() == 1,
              "outlier_idx dtype/shape")
            e(k == 0 or 0 <= int(parts["outlier_idx"].min()) <= int(parts["outlier_idx"].max()) < in_f,
              "outlier index out of range")
        e(set(meta) == {"mode", "threshold", "act_group"}, f"meta keys {sorted(meta)}")
        e(meta["mode"] in ("w8a8", "weight_only"), f"mode {meta['mode']!r}")
        thr, g = meta["threshold"], meta["act_group"]
        e(isinstance(thr, (int, float)) and not isinstance(thr, bool) and math.isfinite(thr) and thr >= 0,
          f"threshold {thr!r}")
        e(isinstance(g, int) and not isinstance(g, bool) and g >= 0 and (g == 0 or in_f % g == 0),
          f"act_group {g!r} (must divide in_features {in_f})")
        return QTensor((out_f, in_f), dict(parts),
                       {"mode": meta["mode"], "threshold": float(meta["threshold"]), "act_group": int(meta["act_group"])})
