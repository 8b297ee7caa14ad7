"""kdlab: knowledge distillation with honest measurements."""

__version__ = "0.1.0"
