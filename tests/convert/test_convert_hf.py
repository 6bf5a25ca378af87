"""Hugging Face <-> Megatron conversion: numerics (logits, per-token loss), bit-exact round trips,
layout independence and bad inputs. CPU only; tiny random models with odd sizes and GQA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from btx_megatron import checkpoint as fmt  # noqa: E402
from btx_megatron.convert import export_hf, import_hf, mapping  # noqa: E402
from tests.convert.convert_workers import megatron_logits, megatron_model, megatron_token_loss, relayout  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

VOCAB = 250  # padded to 256 by the default --make-vocab-size-divisible-by 128
HF_SIZES = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=100, num_hidden_layers=4,
                num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5000.0,
                initializer_range=0.1, max_position_embeddings=64)
SEQ = 24


def _hf_dir(tmp_path_factory, name: str, model_cls, config_cls, *, shard: str | None = None, **extra) -> Path:
    torch.manual_seed(11)
    model = model_cls(config_cls(**HF_SIZES, **extra))
    path = tmp_path_factory.mktemp(name)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    (path / "tokenizer.json").write_text('{"model": "tiny"}\n')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # Sharded with an index, to exercise the index reader.
    return _hf_dir(tmp_path_factory, "llama", transformers.LlamaForCausalLM, transformers.LlamaConfig, shard="150KB")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "mixtral", transformers.MixtralForCausalLM, transformers.MixtralConfig,
                   num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def llama_root(llama_dir, tmp_path_factory):
    return import_hf(llama_dir, tmp_path_factory.mktemp("ck") / "llama", progress=False)


@pytest.fixture(scope="module")
def mixtral_root(mixtral_dir, tmp_path_factory):
    return import_hf(mixtral_dir, tmp_path_factory.mktemp("ck") / "mixtral", progress=False)


def _flags(root: Path, *extra: str) -> list[str]:
    return (root / "model_args.txt").read_text().split() + ["--seq-length", str(SEQ),
                                                          "--transformer-impl", "local", *extra]


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def _tokens(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


# --- pure mappings ---------------------------------------------------------------------------


def test_qkv_layout_matches_megatron_split():
    """The fused rows follow get_query_key_value_tensors: per group [Q/G query heads, k, v]."""
    heads, groups, d, hidden = 6, 2, 4, 5
    q = torch.arange(heads * d).repeat_interleave(hidden).reshape(heads * d, hidden).float()
    k = 1000 + torch.arange(groups * d).repeat_interleave(hidden).reshape(groups * d, hidden).float()
    v = 2000 + torch.arange(groups * d).repeat_interleave(hidden).reshape(groups * d, hidden).float()
    fused = mapping.qkv_hf_to_megatron(q, k, v, groups, d)
    # Megatron: output viewed as [G, (Q/G + 2) * D] then split [Q/G * D, D, D].
    grouped = fused.reshape(groups, (heads // groups + 2) * d, hidden)
    mq, mk, mv = torch.split(grouped, [heads // groups * d, d, d], dim=1)
    assert torch.equal(mq.reshape(heads * d, hidden), q)
    assert torch.equal(mk.reshape(groups * d, hidden), k)
    assert torch.equal(mv.reshape(groups * d, hidden), v)
    assert all(torch.equal(a, b) for a, b in zip(mapping.qkv_megatron_to_hf(fused, heads, groups, d), (q, k, v)))


def test_vocab_padding_is_zero_and_removed():
    w = torch.randn(250, 3)
    padded = mapping.pad_vocab(w, 256)
    assert padded.shape == (256, 3) and torch.equal(padded[250:], torch.zeros(6, 3))
    assert torch.equal(mapping.unpad_vocab(padded, 250), w)


# --- import: numerics --------------------------------------------------------------------------


def test_import_writes_checkpoint_flags_and_tokenizer(llama_root, llama_dir):
    ckpt_dir, iteration = fmt.resolve(llama_root)
    manifest = fmt.read_manifest(ckpt_dir)
    assert iteration == 0 and manifest["kind"] == "dense"
    assert manifest["btx"]["hf_architecture"] == "LlamaForCausalLM"
    m = manifest["model"]
    assert (m["num_layers"], m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"],
            m["num_query_groups"], m["vocab_size"], m["rotary_base"], m["norm_epsilon"]) == (4, 48, 100, 6, 2, 250, 5000, 1e-5)
    assert m["untie_embeddings_and_output_weights"] is True
    assert (llama_root / "tokenizer" / "tokenizer.json").read_text() == (llama_dir / "tokenizer.json").read_text()
    from btx_megatron.config import parse_config

    cfg, _ = parse_config(_flags(llama_root))
    assert cfg.model.architecture() == {k: m[k] for k in cfg.model.architecture()}
    # model.yaml holds the same options, typed (for --config).
    import yaml

    options = yaml.safe_load((llama_root / "model.yaml").read_text())
    for key, value in options.items():
        field = key.replace("-", "_")
        assert m[field] == (value if field != "untie_embeddings_and_output_weights" else True), key


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_imported_logits_match_hugging_face(kind, request):
    hf_dir = request.getfixturevalue(f"{kind}_dir")
    root = request.getfixturevalue(f"{kind}_root")
    _, model = megatron_model(_flags(root), load=str(root))
    tokens = _tokens()
    ours = megatron_logits(model, tokens)
    assert ours.shape[-1] == 256
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert theirs.abs().max() > 0.5  # logits large enough for the comparison to mean something
    assert (ours[..., :VOCAB] - theirs).abs().max().item() <= 1e-4
    # Zero padding rows: the padded vocabulary entries have logit exactly 0.
    assert torch.equal(ours[..., VOCAB:], torch.zeros_like(ours[..., VOCAB:]))


# --- export: bit-exact round trips -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_export_of_import_is_bit_exact(kind, request, tmp_path):
    hf_dir = request.getfixturevalue(f"{kind}_dir")
    root = request.getfixturevalue(f"{kind}_root")
    out = export_hf(root, tmp_path / "hf", max_shard_size=200_000, progress=False)
    original, exported = _hf_tensors(hf_dir), _hf_tensors(out)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original) and len(set(index["weight_map"].values())) > 1
    src, dst = json.loads((hf_dir / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "num_local_experts",
                "num_experts_per_tok", "router_aux_loss_coef"):
        assert dst.get(key) == src.get(key), key
    assert dst["rope_theta"] == src["rope_parameters"]["rope_theta"]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    # transformers reads the exported directory (sharded, with index) back.
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = _tokens(9)
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, ref(tokens).logits)
    assert not list(tmp_path.glob(".hf.tmp-*"))


def test_import_from_bin_bf16_and_tied_embeddings(tmp_path):
    """pytorch_model.bin input, bfloat16 weights (kept as bf16) and tie_word_embeddings=True
    (no output_layer key) round-trip bit for bit."""
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_SIZES, "num_hidden_layers": 2},
                                                                tie_word_embeddings=True))
    src = tmp_path / "bin"
    hf.to(torch.bfloat16).save_pretrained(src)
    tensors = _hf_tensors(src)
    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    root = import_hf(src, tmp_path / "ck", progress=False)
    ckpt_dir, _ = fmt.resolve(root)
    manifest = fmt.read_manifest(ckpt_dir)
    assert manifest["model"]["untie_embeddings_and_output_weights"] is False and manifest["precision"] == "bf16"
    out = export_hf(root, tmp_path / "out", progress=False)
    exported = _hf_tensors(out)
    assert sorted(exported) == sorted(tensors) and "lm_head.weight" not in exported
    for k, v in tensors.items():
        assert v.dtype == torch.bfloat16 and exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"


# --- layouts ------------------------------------------------------------------------------------


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "btx_export.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "btx_export.json")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow  # an 8-process layout
def test_round_trip_from_tp2_pp2_ep2_gives_same_files(llama_root, mixtral_root, tmp_path):
    """Load the imported checkpoints at TP2/PP2 (dense) and PP2/EP2 (MoE) with the trainer's
    loader, save them with the trainer's saver, export: byte-identical to the TP1 export."""
    dense_flags = _flags(llama_root, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    moe_flags = _flags(mixtral_root, "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2")
    run_distributed(relayout, 4, dense_flags, str(llama_root), str(tmp_path / "dense_tp2pp2"))
    run_distributed(relayout, 4, moe_flags, str(mixtral_root), str(tmp_path / "moe_pp2ep2"))
    for root, relaid, layout in ((llama_root, "dense_tp2pp2", "tensor_model_parallel_size"),
                                 (mixtral_root, "moe_pp2ep2", "expert_model_parallel_size")):
        ckpt_dir, _ = fmt.resolve(tmp_path / relaid)
        assert fmt.read_manifest(ckpt_dir)["layout"][layout] == 2
        shutil.copytree(root / "tokenizer", tmp_path / relaid / "tokenizer")
        a = export_hf(root, tmp_path / f"{relaid}_ref", progress=False, max_shard_size=300_000)
        b = export_hf(tmp_path / relaid, tmp_path / f"{relaid}_hf", progress=False, max_shard_size=300_000)
        _same_files(a, b)


# --- a BTX-style MoE checkpoint evaluates the same in transformers ---------------------------


def test_moe_checkpoint_per_token_loss_matches_transformers(tmp_path):
    """A 4-expert top-2 MoE checkpoint written by the trainer's saver (random weights, as a merged
    BTX model would be), exported to Mixtral: transformers' per-token loss == the model's own.
    Vocabulary 256 (no padding): Megatron's loss normalises over the padded vocabulary too."""
    from btx_megatron.training import checkpointing

    flags = ("--num-layers 2 --hidden-size 48 --ffn-hidden-size 100 --num-attention-heads 6 "
             "--num-query-groups 2 --seq-length 24 --vocab-size 256 --swiglu --normalization RMSNorm "
             "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
             "--num-experts 4 --moe-router-topk 2 --init-method-std 0.1 --rotary-base 10000 "
             "--transformer-impl local").split()
    cfg, model = megatron_model(flags, seed=21)
    checkpointing.save_checkpoint(cfg, 7, [model], save_dir=str(tmp_path / "btx"),
                                  extra_manifest={"btx": {"method": "btx-merge (test)", "expert_names": list("abcd")}})
    out = export_hf(tmp_path / "btx", tmp_path / "hf", progress=False)
    tokens = torch.randint(0, 256, (2, SEQ + 1), generator=torch.Generator().manual_seed(3))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ours = megatron_token_loss(model, inputs, labels)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        logits = hf(inputs).logits
    theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), reduction="none")
    assert ours.shape == labels.shape
    assert (ours.reshape(-1) - theirs).abs().max().item() <= 1e-4
    # Different tokens are routed to different expert pairs (the check covers routing).
    router = hf.model.layers[0].mlp.gate.weight if hasattr(hf.model.layers[0], "mlp") else None
    if router is not None:
        with torch.no_grad():
            top = (hf.model.embed_tokens(inputs) @ router.T).topk(2, dim=-1).indices
        assert len({tuple(sorted(t)) for t in top.reshape(-1, 2).tolist()}) > 1


# --- bad inputs ---------------------------------------------------------------------------------


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def test_unsupported_architecture_and_broken_inputs(llama_dir, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM"):
        import_hf(bad, tmp_path / "out1", progress=False)

    shapes = tmp_path / "shapes"
    shutil.copytree(llama_dir, shapes)
    (shapes / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="layers.0.mlp.gate_proj.weight has shape \\[100, 48\\] but config.json implies \\[96, 48\\]"):
        import_hf(shapes, tmp_path / "out2", progress=False)

    missing = tmp_path / "missing"
    shutil.copytree(llama_dir, missing)
    shard = sorted(missing.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"missing: \\['{shard.name}'\\]"):
        import_hf(missing, tmp_path / "out3", progress=False)

    index_gap = tmp_path / "index_gap"
    shutil.copytree(llama_dir, index_gap)
    index = json.loads((index_gap / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.self_attn.k_proj.weight"]
    (index_gap / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing from the weights/index.*layers.2.self_attn.k_proj"):
        import_hf(index_gap, tmp_path / "out4", progress=False)

    # A shard cut short is found only when the streaming import reaches it: nothing is left behind.
    truncated = tmp_path / "truncated"
    shutil.copytree(llama_dir, truncated)
    last = sorted(truncated.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-64])
    with pytest.raises(ValueError, match=f"{last.name} .*ends 64 bytes early; the file is truncated"):
        import_hf(truncated, tmp_path / "out5", progress=False)
    (truncated / last.name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=f"{last.name} is not a valid safetensors file"):
        import_hf(truncated, tmp_path / "out6", progress=False)

    for name in ("out1", "out2", "out3", "out4", "out5", "out6"):
        assert not (tmp_path / name).exists()
    _no_leftovers(tmp_path)


def test_export_refuses_optimizer_only_and_inexpressible_routers(mixtral_root, tmp_path):
    import torch.distributed.checkpoint as dcp

    opt = fmt.iteration_dir(tmp_path / "opt", 5)
    opt.mkdir(parents=True)
    dcp.save({"optimizer.state.exp_avg.decoder.final_layernorm.weight": torch.zeros(48)},
             storage_writer=dcp.FileSystemWriter(str(opt)), no_dist=True)
    (opt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    src_manifest = fmt.read_manifest(fmt.resolve(mixtral_root)[0])
    fmt.write_json_atomic(opt / fmt.MANIFEST, src_manifest)
    fmt.write_text_atomic(tmp_path / "opt" / fmt.TRACKER, "5\n")
    with pytest.raises(ValueError, match="holds no model weights"):
        export_hf(tmp_path / "opt", tmp_path / "out_opt", progress=False)
    assert not (tmp_path / "out_opt").exists()

    sampled = tmp_path / "sampled"
    shutil.copytree(mixtral_root, sampled)
    ckpt_dir, _ = fmt.resolve(sampled)
    manifest = fmt.read_manifest(ckpt_dir)
    manifest["model"]["moe_router_type"] = "sample-top1"
    fmt.write_json_atomic(ckpt_dir / fmt.MANIFEST, manifest)
    with pytest.raises(ValueError, match="sample-top1.*--allow-approximate-router"):
        export_hf(sampled, tmp_path / "out_sampled", progress=False)
    assert not (tmp_path / "out_sampled").exists()
    out = export_hf(sampled, tmp_path / "out_sampled", progress=False, allow_approximate_router=True)
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1
    assert "sample-top1" in json.loads((out / "btx_export.json").read_text())["router_note"]
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        export_hf(sampled, out, progress=False, allow_approximate_router=True)
    _no_leftovers(tmp_path)


def test_overwrite_never_replaces_a_source_or_a_foreign_directory(llama_dir, llama_root, tmp_path):
    def files(path: Path) -> dict[str, int]:
        return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}

    hf_before, root_before = files(llama_dir), files(llama_root)
    for output in (llama_dir, llama_dir.parent, llama_dir / "sub"):
        with pytest.raises(ValueError, match="source"):
            import_hf(llama_dir, output, overwrite=True, progress=False)
    for output in (llama_root, llama_root / "hf"):
        with pytest.raises(ValueError, match="source"):
            export_hf(llama_root, output, overwrite=True, progress=False)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an output of this tool"):
        import_hf(llama_dir, foreign, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="not an output of this tool"):
        export_hf(llama_root, foreign, overwrite=True, progress=False)
    assert files(llama_dir) == hf_before and files(llama_root) == root_before
    assert (foreign / "keep.txt").read_text() == "mine"
    # An earlier output of the same tool is replaced.
    out = export_hf(llama_root, tmp_path / "hf", progress=False)
    assert export_hf(llama_root, out, overwrite=True, progress=False) == out
    _no_leftovers(tmp_path)
