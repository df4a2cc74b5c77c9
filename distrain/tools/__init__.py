"""Offline tools that read runs and machines, never train: `runs ls`, `plot`, `doctor`, `plan`."""
