"""Inputs shared by the launcher tests: a tokenizer, per-domain datasets, tiny dense checkpoints
(the seed and three branches, saved by the trainer) and their merge by tools/merge_branches.py."""

from __future__ import annotations


import pytest

from tests.slurm.slurm_harness import DOMAINS, make_dataset, make_tokenizer, merge, save_initial_checkpoints


@pytest.fixture(scope="session")
def cluster_inputs(tmp_path_factory):
    from tests.dist_utils import run_distributed

    root = tmp_path_factory.mktemp("cluster_inputs")
    tokenizer = make_tokenizer(root / "tokenizer")
    data = root / "data"
    data.mkdir()
    for i, domain in enumerate(DOMAINS):
        # The names slurm/branch_<domain>.sh and slurm/mix.sh expect.
        make_dataset(data / f"{domain}_text_document", seed=10 + i)
        make_dataset(data / f"{domain}_valid_text_document", seed=20 + i, num_docs=8)
        for split in ("train", "valid"):
            (data / f"{domain}_{split}.bin").symlink_to(data / f"{domain}_{'text' if split == 'train' else 'valid_text'}_document.bin")
            (data / f"{domain}_{split}.idx").symlink_to(data / f"{domain}_{'text' if split == 'train' else 'valid_text'}_document.idx")
    dense = {name: root / "dense" / name for name in DOMAINS}
    run_distributed(save_initial_checkpoints, 1, {str(i + 1): str(path) for i, path in enumerate(dense.values())})
    merged = merge(root / "merged", dense)
    return {"root": root, "tokenizer": tokenizer, "data": data, "dense": dense, "merged": merged}
