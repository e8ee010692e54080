"""CPSC-DFKD data-free knowledge distillation, distributed with Ray Train and tuned with Ray Tune."""

__version__ = "0.1.0"
