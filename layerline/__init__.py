"""layerline: serve one model split by layer ranges, with speculative decoding from stage 0."""

import os

__version__ = "0.1.0"

# transformers warns at import that PyTorch is absent; layerline only uses its tokenizers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _load_fast_blas() -> None:
    # Must run before anything imports mlx: mlx binds its BLAS symbols when it loads.
    from .runtime.model.blas import load_fast_blas

    load_fast_blas()


_load_fast_blas()
