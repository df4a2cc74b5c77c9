"""Data: the global-step sampler, the step loader (torch's DataLoader), built-in datasets, per-sample seeding."""

from distrain.data.collate import collate_samples, resolve_collate_fn
from distrain.data.datasets import DATASETS, DataSpec, TensorPairDataset, build_datasets, decode, encode
from distrain.data.loader import EvalLoader, LoaderOptions, StepLoader, auto_num_workers
from distrain.data.batches import fetch_batch, move_to, split_input_target
from distrain.data.sampler import GlobalStepSampler
from distrain.data.seeding import EVAL_STEP, FetchContext, fetch_context, sample_rng, sample_seed

__all__ = ["DATASETS", "DataSpec", "TensorPairDataset", "build_datasets", "decode", "encode", "fetch_batch",
           "move_to", "split_input_target", "GlobalStepSampler", "StepLoader", "EvalLoader", "LoaderOptions",
           "auto_num_workers", "collate_samples", "resolve_collate_fn", "sample_rng", "sample_seed", "fetch_context",
           "FetchContext", "EVAL_STEP"]
