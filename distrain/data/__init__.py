"""Data: the global-step sampler, built-in datasets, and batch fetching for any map-style Dataset."""

from distrain.data.datasets import DATASETS, DataSpec, TensorPairDataset, build_datasets, decode, encode
from distrain.data.loading import fetch_batch, move_to, split_input_target
from distrain.data.sampler import GlobalStepSampler

__all__ = ["DATASETS", "DataSpec", "TensorPairDataset", "build_datasets", "decode", "encode", "fetch_batch",
           "move_to", "split_input_target", "GlobalStepSampler"]
