"""Telemetry written while training: per-rank logs, metrics sinks, the console progress, step timing and memory,
FLOPs and MFU, the run record (run.json), and the unit formatters every report shares."""
