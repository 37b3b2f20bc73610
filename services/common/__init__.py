"""Code every stage shares: errors, config helpers, the gRPC server factory and its error interceptor."""
