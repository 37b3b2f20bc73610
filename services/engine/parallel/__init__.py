"""Tensor parallelism: one engine spread over several GPUs (or, for tests, CPU processes) of one host.

`sharding` holds the pure math (which rows and columns each rank owns), `layers` the modules that
wrap the model's linears with their collectives, `comm` the private communicator, `protocol` the
step messages rank 0 broadcasts, `runner` the per-rank model runner, `launch` the start-up of the
other ranks, and `rank_worker` their process entry point.
"""
