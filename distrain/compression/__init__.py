"""Model compression: magnitude pruning on a schedule, quantization-aware training and int8 export (torchao), and
the state of compressing DDP comm hooks (PowerSGD) kept across a resume.

Kept free of imports so that config validation (``distrain.compression.checks``) stays torch-free and fast; import
what you need from the submodules: ``pruning``, ``qat``, ``quantized_export``, ``powersgd``, ``state``.
"""
