"""What a run prints while it trains: a progress bar on a terminal, one line per epoch."""

from __future__ import annotations

from typing import Any, Dict


def epoch_summary(name: str, record: Dict[str, Any]) -> str:
    keys = ["train_loss", "train_accuracy", "val_accuracy", "val_agreement", "val_mse"]
    parts = [f"{k}={record[k]:.4f}" for k in keys if k in record]
    return f"{name} epoch {record['epoch']}: " + " ".join(parts) + f" ({record['epoch_seconds']:.1f}s)"


class Quiet:
    def __call__(self, it, **_):
        return it


def progress_bar(enabled: bool):
    if not enabled:
        return Quiet()
    from tqdm.auto import tqdm

    class _Bar:
        write = staticmethod(tqdm.write)

        def __call__(self, it, total, desc):
            return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)

    return _Bar()
