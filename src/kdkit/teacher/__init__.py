"""The frozen teacher, several teachers as one, and the cache of their outputs.

- :mod:`.teacher`: :class:`Teacher`, the frozen eval-mode wrapper methods call with a batch, and
  :class:`TeacherEnsemble`, several teachers behind one call.
- :mod:`.cache`: :class:`~kdkit.teacher.cache.TeacherCache`, the teacher's outputs stored once per training set.
- :mod:`.augment`: replayable crop/flip views, so augmented data can still use the cache.
"""

from .teacher import EnsembleModel, Teacher, TeacherEnsemble, as_teacher, ensemble_weights

__all__ = ["EnsembleModel", "Teacher", "TeacherEnsemble", "as_teacher", "ensemble_weights"]
