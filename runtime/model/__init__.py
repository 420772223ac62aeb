"""One machine's model: layer ranges, the embedding and head, KV caches, weights, BLAS, tokenizer."""
