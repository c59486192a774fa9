"""Progress of long stages: items/s and ETA on stderr (tqdm), or nothing when progress is off."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, label: str, total: int, unit: str = "items", enabled: bool = True):
        self.bar = None
        if enabled:  # off, no tqdm at all: even a disabled bar creates tqdm's lock, importing multiprocessing (60 ms)
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=unit, unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.1, bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} "
                                                      "[{elapsed}<{remaining}, {rate_fmt}]")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
