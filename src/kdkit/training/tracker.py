"""Epoch statistics kept on the device, so the training step never waits for the host."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .distributed import all_reduce


class Tracker:
    """Epoch statistics kept on the device: no host sync until :meth:`first_bad` / :meth:`result`.

    Each micro-step writes one row ``[loss, parts..., hits, labelled]`` into a (steps, K) device buffer
    (one ``stack`` and one copy per step, whatever the number of parts), so the first non-finite loss can be
    named exactly and the epoch means are one weighted sum at the end. The scalar parts are those of the
    epoch's first step (a part missing later counts as 0).
    """

    def __init__(self, device: torch.device, steps: int):
        self.device = device
        self.steps = steps
        self.keys: Optional[List[str]] = None
        self.buf: Optional[torch.Tensor] = None
        self.labels = False
        self.tokens = False
        self.sizes: List[int] = []
        self.checked = 0

    def add(self, step: int, out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]) -> None:
        self.sizes.append(batch["x"].shape[0])
        y = batch.get("y")
        logits = out.get("logits")
        if self.keys is None:
            self.keys = ["loss"] + [k for k, v in out.items()
                                    if k not in ("loss", "logits") and torch.is_tensor(v) and v.dim() == 0]
            self.labels = y is not None and not y.is_floating_point() and logits is not None and logits.dim() == 2
            # Causal LM: (B, L', V) logits against (B, L) token targets, -100 where nothing is predicted.
            self.tokens = (y is not None and not y.is_floating_point() and logits is not None and logits.dim() == 3
                           and y.dim() == 2)
            self.buf = torch.zeros(self.steps, len(self.keys) + 2, device=self.device)
        zero = None
        row = []
        for k in self.keys:
            v = out.get(k)
            if v is None:
                zero = zero if zero is not None else torch.zeros((), device=self.device)
                v = zero
            row.append(v.detach())
        if self.labels:
            # Unlabelled samples carry y = -1, which argmax never equals: no mask needed for the hits.
            row.append((logits.detach().argmax(1) == y).sum(dtype=torch.float32))
            row.append((y >= 0).sum(dtype=torch.float32))
        elif self.tokens:
            # Next-token hits over target positions: -100 never equals an arg-max. Columns the model trimmed
            # (padding in the whole batch) hold -100 only.
            y = y[:, :logits.shape[1]]
            row.append((logits.detach().argmax(-1) == y).sum(dtype=torch.float32))
            row.append((y >= 0).sum(dtype=torch.float32))
        self.buf[step, :len(row)] = torch.stack(row)

    @property
    def losses(self) -> torch.Tensor:
        return self.buf[:, 0] if self.buf is not None else torch.zeros(0)

    def first_bad(self, upto: int) -> Optional[int]:
        """Index of the first non-finite loss among steps [checked, upto), or None (one host sync)."""
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
