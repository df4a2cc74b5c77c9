"""distrain: distributed data-parallel training for PyTorch — one config, one loop, proven equal across scale."""

from distrain.version import __version__


def __getattr__(name):  # lazy: `import distrain` stays cheap for the CLI's error paths
    if name == "Trainer":
        # lazy: start-up: `import distrain` loads nothing until a name is used
        from distrain.training.trainer import Trainer

        return Trainer
    if name in ("Config", "load_config"):
        from distrain import config  # lazy: start-up: `import distrain` loads nothing until a name is used

        return getattr(config, name)
    if name in ("load_model", "load_weights", "classify", "generate_text"):
        from distrain import inference  # lazy: start-up: `import distrain` loads nothing until a name is used

        return getattr(inference, name)
    if name == "evaluate_checkpoint":
        # lazy: start-up: `import distrain` loads nothing until a name is used
        from distrain.inference.evaluate import evaluate_checkpoint

        return evaluate_checkpoint
    if name == "export_checkpoint":
        # lazy: start-up: `import distrain` loads nothing until a name is used
        from distrain.checkpoint.export import export_checkpoint

        return export_checkpoint
    if name in ("ConfigError", "DistrainError", "CheckpointError"):
        from distrain import errors  # lazy: start-up: `import distrain` loads nothing until a name is used

        return getattr(errors, name)
    raise AttributeError(f"module 'distrain' has no attribute {name!r}")


__all__ = ["Trainer", "Config", "load_config", "ConfigError", "DistrainError", "CheckpointError", "__version__",
           "load_model", "load_weights", "classify", "generate_text", "evaluate_checkpoint", "export_checkpoint"]
