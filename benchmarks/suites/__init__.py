"""The benchmark suites, in report order. Each module has ``run(opts)`` (the driver: which jobs to start),
``worker(params, info, device)`` (inside every rank, when it starts jobs) and ``report(result, ctx)``
(its BENCHMARKS.md section, plots and target checks)."""

SUITES = ["step_time", "comm", "memory", "scaling", "startup", "data"]

# Runnable by name but not part of the full run: issue 3's benchmark is the ddp row of step_time; gpu is the
# one-GPU GPT-2 124M comparison (a tiny CPU shape where there is no GPU); compression is issue 22's measurements;
# scale is issue 21's costs against the world size (W = 1 to 32 ranks on this machine); stragglers: what straggler
# tracking costs per step (issue 20); loop_cost is issue 20's: distrain's own work per step; auto_micro is issue 19's
# cost of train.micro_batch=auto once settled.
EXTRA_SUITES = ["ddp_overhead", "gpu", "compression", "scale", "stragglers", "loop_cost", "auto_micro"]
