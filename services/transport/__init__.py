"""KV-cache page transports between prefill and decode workers (`host` now; `cuda-ipc`, `nccl` later)."""
