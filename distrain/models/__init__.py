"""Built-in example models and the registry that builds them from ``model.name`` / ``model.kwargs``."""

from distrain.models import language, vision  # noqa: F401  (registers the built-ins)
from distrain.models.registry import MODEL_FLOPS, MODELS, build_model, register_flops, register_model

__all__ = ["MODEL_FLOPS", "MODELS", "build_model", "register_flops", "register_model"]
