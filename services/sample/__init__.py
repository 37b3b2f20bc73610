"""The sampling library: logits to tokens. Runs in-process in decode or as the Sample service."""
