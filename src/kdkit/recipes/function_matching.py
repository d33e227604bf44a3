"""Function matching: "Knowledge distillation: A good teacher is patient and consistent" (Beyer, Zhai, Royer,
Markeeva, Anil & Kolesnikov, CVPR 2022).

The recipe: teacher and student see the *same* aggressively augmented view of every image (crop/flip, then
mixup and/or CutMix with a fresh partner and weight every step), the loss is the KL divergence from the
teacher's distribution to the student's on that view (temperature 1, no labels), and the schedule is long:
the paper's students keep improving for thousands of epochs. Mixed views are never seen twice, so the
teacher runs live on every step (no teacher cache, see :class:`kdkit.teacher.augment.Mix`): that is what the
recipe costs against cached KD, measured by ``benchmarks/function_matching.py``.

From a config::

    data: {name: digits, augment: crop_flip, mixup: 1.0}
    method: {name: kd, temperature: 1.0, alpha: 1.0}

(``configs/digits_function_matching.yaml``); from Python, :func:`function_matching`.
"""

from __future__ import annotations

from typing import Any

from ..api import Run, distill
from ..data.core import ArrayData, as_dataset
from ..errors import KdkitError
from ..teacher.augment import AugmentedData, CropFlip, Mix

#: The method of the recipe: KL to the teacher at T=1 (``kd`` with alpha=1 ignores labels; mixed batches have none).
METHOD = {"method": "kd", "temperature": 1.0, "alpha": 1.0}


def function_matching_data(train_data, *, mixup: float = 1.0, cutmix: float = 0.0, crop_flip: bool = True,
                           pad: int = 2, seed: int = 0) -> AugmentedData:
    """``train_data`` (images (N, C, H, W): a Dataset of kdkit's, an ``(x, y)`` tuple or a tensor) with
    function matching's views: crop/flip (``pad`` pixels) then mixup/CutMix, drawn from ``(seed, epoch, step)``.

    Raises:
        KdkitError: the data is not in-memory images.
    """
    data = as_dataset(train_data, "train")
    if not isinstance(data, ArrayData) or data.x.dim() != 4:
        raise KdkitError("function matching needs in-memory images (N, C, H, W) as training data; got "
                         f"{type(data).__name__}" + (f" of shape {tuple(data.x.shape)}" if hasattr(data, "x") else ""))
    try:
        mix = Mix(mixup, cutmix, CropFlip(pad, True, 1, seed) if crop_flip else None, seed)
    except ValueError as e:
        raise KdkitError(f"function matching: {e}") from None
    return AugmentedData(data.x, data.y, mix)


def function_matching(teacher, student, train_data, val_data=None, *, epochs: int = 100, mixup: float = 1.0,
                      cutmix: float = 0.0, crop_flip: bool = True, pad: int = 2, seed: int = 0,
                      **options: Any) -> Run:
    """Distil ``teacher`` into ``student`` by function matching; ``options`` go to :func:`kdkit.distill`
    (``test_data``, ``out_dir``, ``lr``, ``batch_size``, ...). Returns the :class:`kdkit.api.Run`."""
    data = function_matching_data(train_data, mixup=mixup, cutmix=cutmix, crop_flip=crop_flip, pad=pad, seed=seed)
    return distill(teacher, student, data, val_data, epochs=epochs, seed=seed, **{**METHOD, **options})
