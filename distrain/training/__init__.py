"""The training loop (``Trainer``: split -> train -> update -> sync), its losses and objective, its run directory
(the optimizers and the lr schedule are distrain/optim.py)."""
