"""Resident memory of this process, and the peak of one phase (Linux: /proc/self/status; the peak is reset by
writing 5 to /proc/self/clear_refs). Elsewhere the phase peak is unknown (None)."""

from __future__ import annotations

from pathlib import Path

STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_mb(key: str) -> float | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class PhasePeak:
    """``with PhasePeak() as p: ...`` then ``p.mb``: how far the resident set rose above where it stood at the
    start, at its highest (None where the OS cannot say)."""

    def __enter__(self) -> "PhasePeak":
        try:
            CLEAR.write_text("5")
            self.start = _status_mb("VmRSS")
        except OSError:
            self.start = None
        self.mb = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_mb("VmHWM")
        if self.start is not None and peak is not None:
            self.mb = round(max(peak - self.start, 0.0), 1)
