"""Routers of the merge (btx_megatron.merge.router_init): centroid rows, and centroids computed
from each branch's own data through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.merge.merge_fixtures import L, ROUTER, TINY, build, iter_dir as _iter, load, merge, parse, read_dcp


def test_centroid_router_rows(work, tmp_path):
    cents = torch.randn(3, L, 64, generator=torch.Generator().manual_seed(5))
    merged = merge(tmp_path / "cent", work["branches"], router_init="centroid", centroids=cents)
    r = read_dcp(_iter(merged))[ROUTER]
    for l in range(L):
        cos = torch.nn.functional.cosine_similarity(r[l].double(), cents[:, l].double(), dim=-1)
        torch.testing.assert_close(cos, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close(r[l].norm(dim=-1), torch.full((3,), 0.02 * 8.0), rtol=1e-5, atol=0)


def test_cli_centroid_router_from_branch_data(work, tmp_path):
    import importlib.util

    from btx_megatron.config.schema import DataConfig
    from btx_megatron.data.datasets import build_domain_eval_datasets
    from btx_megatron.data.tokenizers import build_tokenizer
    from tests.merge.merge_fixtures import write_token_dataset

    spec = importlib.util.spec_from_file_location("merge_branches", Path(__file__).parents[2] / "tools/merge_branches.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    branches = work["branches"][:2]
    prefixes = {n: write_token_dataset(tmp_path / n, seed=i, low=100 * i) for i, (n, _) in enumerate(branches)}
    argv = [a for n, p in branches for a in ("--branch", f"{n}={p}")]
    # A repeated name averages over a blend of prefixes (the seed expert's several domains).
    blends = {"math": [prefixes["math"]], "code": [prefixes["code"], prefixes["math"]]}
    argv += [a for n, ps in blends.items() for p in ps for a in ("--centroid-data", f"{n}={p}")]
    argv += ["--router-init", "centroid", "--tokenizer-type", "NullTokenizer", "--centroid-samples", "4",
             "--output", str(tmp_path / "out"), "--quiet"]
    assert cli.main(argv) == 0
    router = read_dcp(_iter(tmp_path / "out"))[ROUTER]
    m = json.loads((_iter(tmp_path / "out") / "btx_checkpoint.json").read_text())
    assert m["btx"]["router_init"] == "centroid" and m["btx"]["centroid"]["tokens"] == {"math": 64, "code": 64}
    # Reference: mean pre-MLP-norm output of each branch model on the same 4 samples.
    tokenizer = build_tokenizer("NullTokenizer", None, 200)
    for e, (name, path) in enumerate(branches):
        ds = build_domain_eval_datasets(DataConfig(eval_domains={name: blends[name]}, tokenizer_type="NullTokenizer"),
                                        tokenizer, seq_length=16, seed=1234, num_samples=4)[name]
        dense = build(parse(TINY))[0]
        load([dense], path)
        dense.eval()
        acts = {l: [] for l in range(L)}
        for l in range(L):
            dense.decoder.layers[l].pre_mlp_layernorm.register_forward_hook(
                lambda mod, inp, out, l=l: acts[l].append(out.reshape(-1, 64).double()))
        with torch.no_grad():
            for i in range(4):
                tok = torch.as_tensor(ds[i]["tokens"]).long().unsqueeze(0)
                dense(tok, torch.arange(tok.shape[1]).unsqueeze(0), None)
        for l in range(L):
            want = torch.cat(acts[l]).mean(0)
            cos = torch.nn.functional.cosine_similarity(router[l, e].double(), want, dim=0)
            assert float(cos) > 1 - 1e-6
    # Bad: a branch without data -> exit status 2 with a message, nothing written.
    no_code_data = argv[:6] + argv[12:-3] + ["--output", str(tmp_path / "o2"), "--quiet"]
    assert "--centroid-data code=" not in " ".join(no_code_data)
    assert cli.main(no_code_data) == 2
    assert not (tmp_path / "o2").exists()


