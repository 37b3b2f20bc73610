"""Benchmarks against a running gateway: workloads, the load generator, and the latency/throughput report."""
