"""The one check that the optional ``hf`` extra (transformers) is installed."""

from __future__ import annotations

from typing import Any

from ..errors import KdkitError


def require_hf() -> Any:
    """Import and return ``transformers``, or raise a :class:`KdkitError` naming the ``hf`` extra."""
    try:
        import transformers
    except ImportError:
        raise KdkitError("this feature needs the optional extra 'hf': pip install 'kdkit[hf]'") from None
    return transformers
