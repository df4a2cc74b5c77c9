"""Built-in example models and the registry that builds them from ``model.name`` / ``model.kwargs``."""

from distrain.models import language, vision  # noqa: F401  (registers the built-ins)
from distrain.models.registry import MODELS, build_model, register_model

__all__ = ["MODELS", "build_model", "register_model"]
