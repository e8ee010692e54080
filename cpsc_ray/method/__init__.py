"""The method, in plain PyTorch: the engine (one CPSC-DFKD epoch, evaluation, state), its loss terms,
generators, schedules and models. Imports torch and ``cpsc_ray.config`` only: no Ray, no files."""
