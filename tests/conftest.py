import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The real default model (SmolLM2-135M-Instruct), prepared once into the user's cache."""
    from srt.default_model import default_model_path

    return default_model_path()
