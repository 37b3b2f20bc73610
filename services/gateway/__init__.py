"""The gateway: admission, routing to prefill and decode workers, incremental detokenization, and the client."""
