"""Optional dependencies: which pip extra of distrain installs each, so a missing one names what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from distrain.errors import UsageError

# import name -> the extra in pyproject.toml's [project.optional-dependencies] that installs it
EXTRAS = {
    "matplotlib": "viz", "tensorboard": "tensorboard",  # plots; TensorBoard event files (metrics.trackers)
    "mlflow": "mlflow", "wandb": "wandb",  # experiment trackers
    "ray": "ray",  # Ray Train (distrain ray, distrain.integrations.ray)
    "kubeflow": "k8s",  # the Kubeflow SDK models that check rendered manifests
    "transformers": "hf",  # Hugging Face models
    "datasets": "data", "tokenizers": "data", "PIL": "data",  # HF datasets, tokenizer files, images
    "torchao": "compress",  # quantization-aware training and int8 export (distrain.compression)
}


def install_hint(package: str) -> str:
    """The pip command that installs an optional dependency, e.g. pip install 'distrain[viz]'."""
    return f"pip install 'distrain[{EXTRAS[package]}]'"


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. matplotlib.pyplot), or raise UsageError naming the extra that installs it."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{purpose} needs {package}, which is not installed in this environment. Install it with "
                         f"`{install_hint(package)}`.") from None
