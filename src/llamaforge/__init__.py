"""llamaforge: fine-tune, evaluate, export and serve LLaMA-family models."""

__version__ = "0.1.0"
