"""KV-cache page transports between prefill and decode workers: `host`, `cuda-ipc` and `nccl`, and the
transfer lifecycle they share (lifecycle.py)."""
