"""A distillation run around the engine: teachers, the probe set, evaluation, health warnings,
checkpoints, run bookkeeping and the one epoch loop. Reads and writes files (``cpsc_ray.storage``);
never imports Ray."""
