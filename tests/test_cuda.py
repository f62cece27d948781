"""CUDA paths (skipped cleanly without a GPU): the int8 GEMM (cuBLASLt through torch._int_mm, M <= 16 padded)
and the dequantizing weight-only path give the CPU results."""

import pytest
import torch

from moeq.quant.base import Stats
from moeq.registry import QUANTIZERS, load_builtins
from moeq.runtime.int8 import Int8Linear

load_builtins()
Q = QUANTIZERS.get("int8")()


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
def test_int8_linear_cuda_matches_cpu(m, mode):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    xc = torch.randn(128, 512, generator=g)
    xc[:, 7] *= 30
    cfg = Q.Config(mode=mode)
    stats = Stats(128, {"amax": xc.abs().amax(0), "hits": (xc.abs() >= 6).sum(0)}) if Q.needs_calibration(cfg) else None
    mod = Int8Linear(Q.quantize(w, cfg, stats), None)
    x = torch.randn(m, 512, generator=g)
    x[:, 7] *= 30
    cpu = mod(x)
    gpu = mod.to("cuda")(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
