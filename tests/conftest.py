import os

import pytest
import torch

# Triton kernels decide at decoration time (when triton.language and the kernel module are
# first imported) whether they run interpreted. Without a GPU they can only run in the
# interpreter, and any test may be the first to import them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The real default model (SmolLM2-135M-Instruct), prepared once into the user's cache."""
    from srt.model_loader.default_model import default_model_path

    return default_model_path()
