"""layerline: serve one model split by layer ranges, with speculative decoding from stage 0."""

import os

__version__ = "0.1.0"

# transformers warns at import that PyTorch is absent; layerline only uses its tokenizers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
