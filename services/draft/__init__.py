"""The draft stage: per-sequence token proposals for speculative decoding (n-gram prompt lookup)."""
