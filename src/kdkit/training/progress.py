"""What a run prints while it trains: one line per epoch, and a progress bar only on a terminal.

Three levels, set by ``train.progress`` / ``train.quiet`` (the CLI's ``--no-progress`` / ``--quiet``):

- default: a bar during each epoch when stderr is a terminal, and one line per epoch;
- ``progress: false`` (``--no-progress``): the epoch lines without the bar;
- ``quiet: true`` (``--quiet``): nothing per epoch; results (stdout), warnings and errors only.

When stderr is not a terminal (CI, ``2> log``, a pipe) there is never a bar: a bar redrawn with ``\\r``
leaves its fragments before every line of a log file (14 KB of them for 36 real lines).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, Optional, TextIO


def epoch_summary(name: str, record: Dict[str, Any]) -> str:
    """``"student epoch 3: train_loss=0.4120 ... (1.2s)"``: the one line an epoch leaves in the log."""
    keys = ["train_loss", "train_accuracy", "val_accuracy", "val_perplexity", "val_agreement", "val_mse"]
    parts = [f"{k}={record[k]:.4f}" for k in keys if k in record]
    return f"{name} epoch {record['epoch']}: " + " ".join(parts) + f" ({record['epoch_seconds']:.1f}s)"


#: Process-wide limits set once by the command line (``--quiet``, ``--no-progress``); a run's own
#: ``train.quiet`` / ``train.progress`` can only add to them.
_LIMITS = {"quiet": False, "bar": True}


def configure(quiet: bool = False, bar: bool = True) -> None:
    """Set the process-wide output level (called by the ``kdkit`` command for its global options)."""
    _LIMITS["quiet"], _LIMITS["bar"] = bool(quiet), bool(bar)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class Progress:
    """The training loop's output: wrap the epoch's batches (:meth:`__call__`), print lines (:meth:`line`).

    Args:
        bar: show a progress bar while an epoch runs (only if ``stream`` is a terminal).
        quiet: print no lines at all (``line``/``epoch`` do nothing).
        stream: where lines and the bar go (default ``sys.stderr``, looked up when created).
    """

    def __init__(self, bar: bool = True, quiet: bool = False, stream: Optional[TextIO] = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet or _LIMITS["quiet"]
        bar = bar and _LIMITS["bar"]
        self.bar = bar and not self.quiet and _is_terminal(self.stream)
        self._tqdm = None

    def __call__(self, it: Iterable, total: Optional[int] = None, desc: str = "") -> Iterable:
        """``it`` itself, or ``it`` wrapped in a bar that disappears when the epoch ends."""
        if not self.bar:
            return it
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)

    def line(self, text: str) -> None:
        """One clean line (unless quiet); printed above a running bar without breaking it."""
        if self.quiet:
            return
        if self._tqdm is not None:
            self._tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def epoch(self, name: str, record: Dict[str, Any]) -> None:
        """The epoch's summary line (see :func:`epoch_summary`)."""
        self.line(epoch_summary(name, record))

    write = line  # the name the loop used before Progress existed


def progress_for(cfg: Any, main: bool = True) -> Progress:
    """The :class:`Progress` of a run from its ``train`` section; processes other than rank 0 print nothing."""
    return Progress(bar=bool(cfg.progress) and main, quiet=bool(getattr(cfg, "quiet", False)) or not main)


def progress_bar(enabled: bool) -> Progress:
    """Older form of :func:`progress_for`: ``enabled`` gives the bar (on a terminal) and the epoch lines."""
    return Progress(bar=enabled, quiet=not enabled)
