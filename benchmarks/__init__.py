"""distrain's benchmarks: distrain side by side with the raw engines, the communication limit, memory against
the ZeRO formulas, scaling, start-up and checkpoints. Run them with ``python -m benchmarks`` (or
``distrain bench``); see docs/benchmarks.md."""
