"""Epoch statistics kept on the device, so the training step never waits for the host."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .distributed import all_reduce


class Tracker:
    """Epoch statistics kept on the device: no host sync until :meth:`first_bad` / :meth:`result`.

    Each micro-step hands its detached scalars ``[loss, parts...]`` over; they are written into a (steps, K + 2)
    device buffer in blocks, at the next sync point (:meth:`_flush`: one ``stack`` per column for the whole
    block), so the first non-finite loss can still be named exactly and the epoch means are one weighted sum at
    the end. Classification hits (arg-max == label) are counted in the same block, from the steps' logits, kept
    (detached) until then: one arg-max over the block instead of one small one per step. The scalar parts are
    those of the epoch's first step (a part missing later counts as 0).
    """

    #: Logits larger than this (elements per step) are reduced to hits at once instead of kept until the flush.
    DEFER_LIMIT = 1 << 16

    def __init__(self, device: torch.device, steps: int):
        self.device = device
        self.steps = steps
        self.keys: Optional[List[str]] = None
        self.buf: Optional[torch.Tensor] = None
        self.labels = False
        self.tokens = False
        self.sizes: List[int] = []
        self.checked = 0
        self.written = 0  # rows of buf filled so far; the steps after it wait in the lists below
        self._rows: List[List[torch.Tensor]] = []  # per pending step: [loss, parts...(, hits, labelled)]
        self._logits: List[torch.Tensor] = []  # per pending step (classification, deferred): (B, C) detached
        self._labels: List[torch.Tensor] = []  # per pending step: (B,) labels, -1 unlabelled
        self._zero: Optional[torch.Tensor] = None

    def add(self, step: int, out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]) -> None:
        self.sizes.append(batch["x"].shape[0])
        y = batch.get("y")
        logits = out.get("logits")
        if self.keys is None:
            self._start(out, y, logits)
        row = []
        for k in self.keys:
            v = out.get(k)
            if v is None:
                if self._zero is None:
                    self._zero = torch.zeros((), device=self.device)
                v = self._zero
            row.append(v.detach() if v.requires_grad else v)
        if self.labels:
            logits = logits.detach()
            if logits.numel() <= self.DEFER_LIMIT:
                self._logits.append(logits)
                self._labels.append(y)
            else:  # a large head: reduced now, so the block never holds many large tensors
                # Unlabelled samples carry y = -1, which argmax never equals: no mask needed for the hits.
                row.append((logits.argmax(1) == y).sum(dtype=torch.float32))
                row.append((y >= 0).sum(dtype=torch.float32))
        elif self.tokens:
            # Next-token hits over target positions: -100 never equals an arg-max. Columns the model trimmed
            # (padding in the whole batch) hold -100 only.
            y = y[:, :logits.shape[1]]
            row.append((logits.detach().argmax(-1) == y).sum(dtype=torch.float32))
            row.append((y >= 0).sum(dtype=torch.float32))
        self._rows.append(row)

    def _start(self, out: Dict[str, torch.Tensor], y, logits) -> None:
        """The columns, from the epoch's first step: the scalar parts, and whether hits are counted."""
        self.keys = ["loss"] + [k for k, v in out.items()
                                if k not in ("loss", "logits") and torch.is_tensor(v) and v.dim() == 0]
        self.labels = y is not None and not y.is_floating_point() and logits is not None and logits.dim() == 2
        # Causal LM: (B, L', V) logits against (B, L) token targets, -100 where nothing is predicted.
        self.tokens = (y is not None and not y.is_floating_point() and logits is not None and logits.dim() == 3
                       and y.dim() == 2)
        self.buf = torch.zeros(self.steps, len(self.keys) + 2, device=self.device)

    def _flush(self) -> None:
        """Write the pending steps' rows into the buffer: a few tensor operations for the whole block."""
        if not self._rows:
            return
        n, k = len(self._rows), len(self.keys)
        start, end = self.written, self.written + n
        width = max(len(r) for r in self._rows)
        if all(len(r) == width for r in self._rows):
            self.buf[start:end, :width] = torch.stack([torch.stack([r[j] for r in self._rows])
                                                       for j in range(width)], dim=1)
        else:  # some steps reduced their hits at once (a large head), others wait: row by row
            for i, r in enumerate(self._rows):
                self.buf[start + i, :len(r)] = torch.stack(r)
        if self._logits:
            steps = [i for i, r in enumerate(self._rows) if len(r) == k]  # the steps whose hits were deferred
            sizes = torch.tensor([len(t) for t in self._labels], device=self.device)
            owner = torch.repeat_interleave(torch.tensor(steps, device=self.device) + start, sizes)
            y = torch.cat(self._labels)
            correct = (torch.cat(self._logits).argmax(1) == y).to(torch.float32)
            self.buf[:, k].index_add_(0, owner, correct)
            self.buf[:, k + 1].index_add_(0, owner, (y >= 0).to(torch.float32))
        self.written = end
        self._rows, self._logits, self._labels = [], [], []

    @property
    def losses(self) -> torch.Tensor:
        self._flush()
        return self.buf[:, 0] if self.buf is not None else torch.zeros(0)

    def first_bad(self, upto: int) -> Optional[int]:
        """Index of the first non-finite loss among steps [checked, upto), or None (one host sync)."""
        self._flush()
        window = self.buf[self.checked:upto, 0]
        bad = ~torch.isfinite(window)
        none = torch.tensor(2**62, device=self.device)
        flag = torch.where(bad.any(), self.checked + bad.to(torch.uint8).argmax(), none).to(torch.long)
        # Under DDP every rank must stop together: take the earliest bad step over ranks.
        flag = int(all_reduce(flag, "min"))
        self.checked = upto
        return None if flag == 2**62 else flag

    def live(self, step: int) -> Dict[str, str]:
        """Progress-bar figures at a sync point: this step's loss and the epoch's running accuracy."""
        self._flush()
        shown = {"loss": f"{float(self.buf[step, 0]):.4f}"}
        if self.labels or self.tokens:
            k = len(self.keys)
            hits, labelled = self.buf[:step + 1, k:k + 2].sum(0).tolist()
            if labelled > 0:
                shown["acc"] = f"{hits / labelled:.3f}"
        return shown

    def result(self) -> Dict[str, float]:
        if self.buf is None:
            return {}
        self._flush()
        n = len(self.sizes)
        sizes = torch.tensor(self.sizes, dtype=torch.float32, device=self.device)
        k = len(self.keys)
        sums = (self.buf[:n, :k] * sizes[:, None]).sum(0)
        vec = torch.cat([sums, self.buf[:n, k:].sum(0), sizes.sum().reshape(1)])
        vec = all_reduce(vec).tolist()  # the epoch's one sync (sum over ranks under DDP)
        seen = max(vec[-1], 1.0)
        record = {f"train_{key}": v / seen for key, v in zip(self.keys, vec)}
        if self.labels and vec[k + 1] > 0:
            record["train_accuracy"] = vec[k] / vec[k + 1]
        elif self.tokens and vec[k + 1] > 0:
            record["train_token_accuracy"] = vec[k] / vec[k + 1]
        return record
