import pytest


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> str:
    """The built-in math/code/wiki corpora at test scale (20k tokens per domain, 1000-piece BPE)."""
    from tests.eval.eval_helpers import build_corpora

    return build_corpora(str(tmp_path_factory.mktemp("eval_corpora")))
