"""Using a trained model: load it from a checkpoint or an export, classify, sample text, evaluate a checkpoint."""

from distrain.inference.predict import (LoadedModel, classify, generate_text, load, load_model, load_weights,
                                        predict_samples, spec_from_dict, unknown_characters)

__all__ = ["LoadedModel", "classify", "generate_text", "load", "load_model", "load_weights", "predict_samples",
           "spec_from_dict", "unknown_characters"]
