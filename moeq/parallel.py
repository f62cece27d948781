"""Several processes on one job, with torch.distributed (gloo on CPU, nccl on GPUs).

``moeq quantize --workers N`` starts N copies of itself with RANK/WORLD_SIZE set (what ``torchrun`` and
``accelerate launch -m moeq ...`` also set), and each joins the process group here. Work is split
deterministically, so the artifact is byte-identical to the one-process run:
- data-free methods: whole decoder layers, round-robin by layer index;
- calibrated methods: rank 0 runs the layer forwards and broadcasts the statistics, then the layer's weights
  (experts) are split round-robin; rank 0 merges the parts into the same shard a single process writes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank (internal process traffic only; nothing is written to disk)."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def owns(self, i: int) -> bool:
        return i % self.world == self.rank


def from_env() -> Dist:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("MOEQ_BACKEND") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    return Dist(rank, world)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], workers: int) -> int:
    """Run ``python -m moeq <argv>`` as ``workers`` processes; rank 0 keeps the terminal. Returns its exit code
    (or the first non-zero code of another rank)."""
    env = {**os.environ, "WORLD_SIZE": str(workers), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # rank 0 keeps the default thread count (its layer forwards then match a one-process run bit for bit)
    others = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))}
    procs = []
    for r in range(workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "moeq", *argv], stdout=None if r == 0 else subprocess.DEVNULL,
                                      env={**env, **(others if r else {}), "RANK": str(r), "LOCAL_RANK": str(r)}))
    codes = [p.wait() for p in procs]
    return codes[0] or next((c for c in codes if c), 0)
