"""The training loop (``Trainer``: split -> train -> update -> sync), its losses and its optimizers."""
