"""layerline: serve one model split by layer ranges, with speculative decoding from stage 0."""

__version__ = "0.1.0"
