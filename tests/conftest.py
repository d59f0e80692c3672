"""Session-wide test set-up: caches and logs stay inside pytest's temporary directories."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    # child processes inherit it, so workers and trainers never touch the user's ~/.cache
    cache = tmp_path_factory.mktemp("agora-cache")
    previous = os.environ.get("AGORA_CACHE_DIR")
    os.environ["AGORA_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("AGORA_CACHE_DIR", None)
    else:
        os.environ["AGORA_CACHE_DIR"] = previous
