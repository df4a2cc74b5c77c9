"""The few torchao names distrain uses, imported in one place: a missing or changed torchao is one paragraph.

torchao's API moves between releases; pyproject.toml's ``compress`` extra pins the range tested here.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

from distrain.errors import ConfigError
from distrain.extras import install_hint

TESTED = ">=0.18,<0.19"
# Loggers that speak at import on a CPU machine: torchao's CUDA kernels that cannot load, and torch's pytree note on
# torchao's enums. Neither matters on the CPU, and each would print on every rank.
QUIET = ("torchao", "torch.utils._pytree")


@functools.lru_cache(maxsize=None)  # QAT asks on every forward: import and look up once (a failure is not cached)
def torchao_api(purpose: str, key: str) -> SimpleNamespace:
    """quantize_, QATConfig and IntxFakeQuantizeConfig (QAT's layer swap), choose_qparams_affine and quantize_affine
    (int8 weights); ``purpose`` and ``key`` name what needs them when torchao is missing or lacks them."""
    levels = {name: logging.getLogger(name).level for name in QUIET}
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401  # lazy: optional and slow to import (distrain[compress]); most runs never need it
    except ImportError:
        raise ConfigError(f"{purpose} needs torchao, which is not installed in this environment. Install it with "
                          f"`{install_hint('torchao')}` (torchao{TESTED}, tested with this torch), or leave "
                          f"{key} out.", key=key) from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    try:  # lazy: optional (distrain[compress]), as above
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
        from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine
    except ImportError as err:
        raise ConfigError(f"{purpose} needs torchao{TESTED}; the installed torchao "
                          f"{getattr(torchao, '__version__', '?')} lacks what distrain calls ({err}). Install the "
                          f"tested range with `{install_hint('torchao')}`.", key=key) from None
    return SimpleNamespace(quantize_=quantize_, QATConfig=QATConfig, IntxFakeQuantizeConfig=IntxFakeQuantizeConfig,
                           MappingType=MappingType,
                           choose_qparams_affine=choose_qparams_affine, quantize_affine=quantize_affine,
                           version=torchao.__version__)
