"""The inference engine: model, paged KV cache, scheduler and runner. Pure library, no gRPC."""
