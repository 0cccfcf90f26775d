"""Shared fixtures of the flow tests."""

import pytest


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory):
    """The default-config digit classifier, trained once per session (used by slow tests only)."""
    from adrpo_jax.flow import pretrain

    return pretrain.train_classifier(pretrain.default_config(), workdir=tmp_path_factory.mktemp("clf"),
                                     log_fn=None)
