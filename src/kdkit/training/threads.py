"""How many CPU threads torch uses in a run (``train.threads`` / ``kdkit --threads N``).

Why kdkit chooses rather than keep torch's default (one thread per core): the models kdkit trains on a
CPU are mostly small (MLPs and small CNNs on batches of 64-128), where a second intra-op thread buys
little, and on a machine shared with other processes, threads that wait for a busy core cost a lot.
On a quiet 2-core machine ``benchmarks/threads.py`` measured 0.021 s per digits epoch with one thread and
0.026 s with two; under load from other processes an earlier measurement saw 2-4.5 s
against 44-74 s per CSV epoch on the same kind of machine.

``auto`` therefore takes half the CPUs this process may run on (at least one): one thread on a 2-core
machine, roughly one per physical core on a machine with hyper-threading. It depends only on the machine
(never on its momentary load), so the same config on the same machine always uses the same count; give an
explicit number for bit-identical results across machines with different CPU counts. An
``OMP_NUM_THREADS`` set in the environment (torchrun sets 1 per process) is an explicit choice and wins
over ``auto``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Optional, Union

from ..errors import KdkitError


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def resolve_threads(value: Union[int, str], cpus: Optional[int] = None,
                    env: Optional[Mapping[str, str]] = None) -> int:
    """The thread count for ``train.threads``: an integer >= 1 as given, or what ``"auto"`` means here.

    Args:
        value: ``train.threads``: an integer >= 1 or ``"auto"``.
        cpus: CPUs available (default :func:`usable_cpus`); a parameter so that tests need no particular machine.
        env: environment (default ``os.environ``); a positive integer ``OMP_NUM_THREADS`` wins over ``"auto"``.

    Returns:
        The count to hand to ``torch.set_num_threads``.

    Raises:
        KdkitError: for anything but an integer >= 1 or ``"auto"``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return value
    elif value == "auto":
        env = os.environ if env is None else env
        omp = env.get("OMP_NUM_THREADS", "").strip()
        if omp.isdigit() and int(omp) >= 1:
            return int(omp)
        return max(1, (usable_cpus() if cpus is None else cpus) // 2)
    raise KdkitError(f"train.threads: expected an integer >= 1 or 'auto'; given {value!r:.80}")


def apply_threads(value: Union[int, str]) -> int:
    """Resolve ``train.threads`` and hand it to ``torch.set_num_threads``; returns the count set."""
    import torch

    n = resolve_threads(value)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Time on one CPU thread: stable on a shared machine, and what one phone core or server worker gets."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
