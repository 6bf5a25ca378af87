"""Shared fixture of the merge tests: three tiny dense branches and their BTX merge."""

from __future__ import annotations

import pytest

from tests.merge.merge_fixtures import make_branch, merge


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    branches = [(name, make_branch(root / name, seed=i + 1)) for i, name in enumerate(["math", "code", "wiki"])]
    merged = merge(root / "moe", branches)
    return {"root": root, "branches": branches, "merged": merged}
