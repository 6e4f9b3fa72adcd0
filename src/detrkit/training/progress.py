"""The progress bar of a training epoch (tqdm), fed by the loop's per-step reports."""

from __future__ import annotations

from typing import Any


class EpochBar:
    """A tqdm bar over an epoch's ``total`` batches, showing loss, learning rate and images/s.

    ``update`` takes the loop's progress report (``loss``, ``lr``, ``img/s`` and ``batches`` read
    since the last report). Disabled (a no-op) when ``enabled`` is False, e.g. off the main process.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, desc=desc, disable=True if not enabled else None, dynamic_ncols=True, leave=True
        )

    def update(self, values: dict[str, float]) -> None:
        self.bar.update(int(values["batches"]))
        self.bar.set_postfix(
            loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.1e}", ips=f"{values['img/s']:.1f}"
        )

    def __enter__(self) -> EpochBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
