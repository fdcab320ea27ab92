import os


# Everything the suite needs is built in code; make any accidental Hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def arithmetic_models():
    """The built-in teacher and student (trained once, then read from the cache; see `TRL_TIP_CACHE`)."""
    from trl_tip.tasks import prepare_arithmetic_models

    return prepare_arithmetic_models(verbose=False)


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory):
    """Randomly initialised tiny teacher and student saved with the offline tokenizer."""
    from trl_tip.tiny_models import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def problems(request):
    """
    The first problems of the built-in arithmetic task's training split (columns `prompt`, `answer`, `completion`):
    as many as the test module's `NUM_PROBLEMS`, 16 if it sets none.
    """
    from trl_tip.tasks import build_arithmetic_dataset

    return build_arithmetic_dataset()["train"].select(range(getattr(request.module, "NUM_PROBLEMS", 16)))


@pytest.fixture(scope="session")
def padded_model_paths(tmp_path_factory):
    """A tiny student and teacher whose `lm_head`s are padded past the tokenizer to different sizes (see builders)."""
    from builders import save_padded_pair

    return save_padded_pair(tmp_path_factory.mktemp("padded-models"))
