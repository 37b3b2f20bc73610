"""Code every stage shares: errors, configuration helpers, and (later) tracing and the server factory."""
