"""Training and per-domain evaluation datasets through Megatron-Core's dataset builder.

Everything here is a thin layer over ``BlendedMegatronDatasetBuilder`` + ``GPTDataset``: this
module parses the blend, checks that each prefix is a complete dataset made with the tokenizer in
use, chooses the index cache directory, and makes the cache build safe when many ranks (and
several jobs sharing one cache, e.g. BTX branches launched together) start at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import warnings
from typing import Callable

from btx_megatron.config.blend import Blend, parse_blend
from btx_megatron.data.tokenizers import fingerprint_of

META_SUFFIX = ".meta.json"
DEFAULT_CACHE_DIRNAME = ".btx_index_cache"


def meta_path(prefix: str) -> str:
    """The sidecar JSON ``tools/preprocess_data.py`` writes beside ``<prefix>.bin/.idx``."""
    return prefix + META_SUFFIX


def validate_prefix(prefix: str, tokenizer=None, flag: str = "--data-path") -> None:
    """ValueError unless ``prefix`` is a complete indexed dataset made with ``tokenizer``."""
    has_bin = os.path.isfile(prefix + ".bin")
    has_idx = os.path.isfile(prefix + ".idx")
    if not (has_bin and has_idx):
        missing = " and ".join(prefix + s for s, ok in ((".bin", has_bin), (".idx", has_idx)) if not ok)
        raise ValueError(
            f"{flag}: dataset prefix {prefix!r} is missing {missing}; a dataset is a .bin/.idx "
            f"pair: run tools/preprocess_data.py --output-prefix {prefix} ... to create it."
        )
    if tokenizer is None or not os.path.isfile(meta_path(prefix)):
        return
    expected = fingerprint_of(tokenizer)
    if expected is None:
        return
    with open(meta_path(prefix)) as f:
        recorded = json.load(f).get("tokenizer", {})
    mismatches = [
        key
        for key in ("sha256", "vocab_size")
        if recorded.get(key) is not None and recorded.get(key) != expected.get(key)
    ]
    if mismatches:
        raise ValueError(
            f"{flag}: dataset {prefix!r} was made with another tokenizer "
            f"({', '.join(f'{k} {recorded.get(k)} != {expected.get(k)}' for k in mismatches)}; "
            f"recorded in {meta_path(prefix)}): pass the --tokenizer-model it was made with "
            f"({recorded.get('model_path', 'see the meta file')}) or re-run "
            "tools/preprocess_data.py with this tokenizer."
        )


def default_cache_path(prefixes: list[str]) -> str:
    """``<directory of the first prefix>/.btx_index_cache``: next to the data, shared by jobs."""
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), DEFAULT_CACHE_DIRNAME)


def content_key(prefixes: list[str]) -> str:
    """A short digest naming the datasets' current files (path, size and mtime of ``.bin``/``.idx``).

    Megatron keys its cached indices on the dataset *path* and the sampling options only, so a
    prefix re-made in place (another tokenizer, more documents) would silently reuse indices of
    the old file: samples cut at the wrong offsets. Cache directories are therefore keyed on this
    digest too. File metadata, not contents: an ``.idx`` of a 100B-token corpus is gigabytes, and
    every rank computes the key at every start.
    """
    import hashlib

    digest = hashlib.sha256()
    for prefix in sorted(set(os.path.abspath(p) for p in prefixes)):
        digest.update(prefix.encode())
        for suffix in (".bin", ".idx"):
            st = os.stat(prefix + suffix)
            digest.update(f"{suffix}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cache_path(data_cfg, prefixes: list[str]) -> str:
    """``--data-cache-path`` (or the default beside the data) / the datasets' content key."""
    return os.path.join(data_cfg.data_cache_path or default_cache_path(prefixes), content_key(prefixes))


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _cache_lock(cache_dir: str):
    """Serialises index building across *jobs* that share a cache directory.

    Within one job Megatron's builder already lets rank 0 build first while the others wait on a
    barrier, then read. Two jobs (e.g. BTX branches started together, sharing the per-domain eval
    sets) each have a rank 0, and Megatron writes its ``.npy`` indices in place; an exclusive
    flock on rank 0 makes the second job wait and then find a complete cache. Only rank 0 takes
    it, so ranks blocked on the barrier never hold it. flock is advisory and may be a no-op on
    some network filesystems; there the guarantee is Megatron's own (one builder per job).
    """
    if _global_rank() != 0:
        yield
        return
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".build.lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _always() -> bool:
    return True


def _gpt_config(data_cfg, tokenizer, *, seq_length: int, seed: int, cache_dir: str | None, **blend_kwargs):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=bool(data_cfg.reset_position_ids),
        reset_attention_mask=bool(data_cfg.reset_attention_mask),
        eod_mask_loss=bool(data_cfg.eod_mask_loss),
        # Causal masking is done inside the model; a [1, S, S] mask per sample is wasted memory.
        create_attention_mask=False,
        **blend_kwargs,
    )


def _build(cls, sizes, config, cache_dir, is_built_on_rank):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    builder = BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank or _always, config)
    if cache_dir is None:
        return builder.build()
    with _cache_lock(cache_dir):
        return builder.build()


_SPLIT_NAMES = ("train", "valid", "test")


def _restrict_splits(config, sizes: list, prefixes: list[str], split: str | None) -> None:
    """Drops splits that are not asked for or that some prefix leaves empty (train: ValueError).

    Megatron builds every split whose ``--split`` share is non-zero, even one asked for 0 samples,
    and a split that holds no documents of some prefix makes ``GPTDataset`` loop forever looking
    for an epoch with tokens in it (e.g. the default ``969,30,1`` on a prefix of < 500
    documents gives the test split nothing). Only the dropped split's entry is removed from the
    split matrix, so the other splits keep exactly the document ranges Megatron-LM gives them.
    An empty valid/test split is returned as None with a warning (BTX reads per-domain eval sets);
    an empty train split is an error.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for i, bookends in enumerate(config.split_matrix):
        if bookends is not None and sizes[i] == 0:
            config.split_matrix[i] = None
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)  # maps only the .idx: cheap
        lengths = dataset.sequence_lengths
        num_documents = len(lengths)
        for i, bookends in enumerate(config.split_matrix):
            if bookends is None:
                continue
            # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
            begin = int(round(bookends[0] * float(num_documents)))
            end = int(round(bookends[1] * float(num_documents)))
            if end > begin and int(lengths[begin:end].sum()) > 0:
                continue
            message = (
                f"--split {split!r} leaves the {_SPLIT_NAMES[i]} split of {prefix!r} "
                f"({num_documents} documents) empty"
            )
            if i == 0:
                raise ValueError(f"{message}: give train a larger share of --split or use a larger dataset.")
            warnings.warn(
                f"{message}, so no {_SPLIT_NAMES[i]} dataset is built although {sizes[i]} samples "
                f"were asked for; give it a larger share of --split (or use --eval-domain sets).",
                stacklevel=3,
            )
            config.split_matrix[i] = None
        del dataset


def _checked_blend(tokens, tokenizer, flag: str) -> Blend:
    blend = parse_blend(tokens, flag=flag)
    for prefix in blend.prefixes:
        validate_prefix(prefix, tokenizer, flag=flag)
    return blend


def build_pretraining_datasets(
    data_cfg,
    tokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    is_built_on_rank: Callable[[], bool] | None = None,
):
    """-> (train_ds, valid_ds, test_ds); a split with weight 0 (or 0 samples) is None.

    Items are dicts of tensors: tokens [S] int64, labels [S] int64, loss_mask [S] float32,
    position_ids [S] int64. ``is_built_on_rank`` defaults to every rank (global rank 0 builds the
    index cache first, the others read it after a barrier); if given, it must be True on rank 0.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    sizes = [None if n is None else int(n) for n in num_samples]
    if data_cfg.mock_data:
        config = _gpt_config(data_cfg, tokenizer, seq_length=seq_length, seed=seed, cache_dir=None)
        _restrict_splits(config, sizes, [], None)
        return tuple(_build(MockGPTDataset, sizes, config, None, is_built_on_rank))

    if not data_cfg.data_path:
        raise ValueError("--data-path is empty: pass PREFIX or W1 PREFIX1 W2 PREFIX2 ..., or --mock-data.")
    blend = _checked_blend(data_cfg.data_path, tokenizer, "--data-path")
    cache_dir = cache_path(data_cfg, blend.prefixes)
    config = _gpt_config(
        data_cfg,
        tokenizer,
        seq_length=seq_length,
        seed=seed,
        cache_dir=cache_dir,
        blend=blend.as_megatron(),
        split=data_cfg.split,
    )
    _restrict_splits(config, sizes, blend.prefixes, data_cfg.split)
    return tuple(_build(GPTDataset, sizes, config, cache_dir, is_built_on_rank))


def build_domain_eval_datasets(
    data_cfg,
    tokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: int | None,
    is_built_on_rank: Callable[[], bool] | None = None,
    flag: str = "--eval-domain",
) -> dict:
    """One validation dataset per ``data_cfg.eval_domains`` entry, in sorted name order.

    ``flag`` names the command-line option the domains came from, for error messages.

    Each domain's prefixes are used whole (they are already held-out validation sets).
    ``num_samples`` None gives exactly one pass over the domain's documents.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset

    datasets = {}
    for name in sorted(data_cfg.eval_domains or {}):
        blend = _checked_blend(data_cfg.eval_domains[name], tokenizer, f"{flag} {name}")
        cache_dir = cache_path(data_cfg, blend.prefixes)
        # blend_per_split puts the whole prefix in the validation split (no train/test carve-out).
        config = _gpt_config(
            data_cfg,
            tokenizer,
            seq_length=seq_length,
            seed=seed,
            cache_dir=cache_dir,
            blend_per_split=[None, blend.as_megatron(), None],
        )
        _, valid, _ = _build(GPTDataset, [None, num_samples, None], config, cache_dir, is_built_on_rank)
        datasets[name] = valid
    return datasets
