"""Training: the one loop (:mod:`.loop`), checkpoints (:mod:`.checkpoint`) and the run directory (:mod:`.rundir`)."""
