"""stageserve: an LLM inference server split into gRPC microservices, one per stage.

The import package `stageserve` is the `services/` folder of the repository; `stageserve.kernels`
is `kernels/`. See README.md for the layout.
"""

__version__ = "0.1.0"
