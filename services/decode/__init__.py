"""The decode stage: receives KV pages, runs the continuous-batching loop, streams tokens."""
