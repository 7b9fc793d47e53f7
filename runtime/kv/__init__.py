"""The paged KV cache (per-layer pools, step layout) and its block allocator with the prefix
cache."""
