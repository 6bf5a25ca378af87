"""Hugging Face conversion throughput and peak memory (CPU), whole commands side by side.

    python benchmarks/bench_convert.py                       # 4 and 8 layers, hidden 512, fp32
    python benchmarks/bench_convert.py --layers 12 24 --hidden-size 1024 --ffn-hidden-size 2816 \
        --num-attention-heads 16 --num-query-groups 16 --vocab-size 32000 --dtype bfloat16

For each depth: a synthetic Llama directory (random weights, safetensors shards) is converted
with ``tools/convert_hf.py import`` and the result exported again with ``export``; each
repetition runs import, export and a plain user-space copy of the weight files (read + write +
fsync) one after the other, each as its own process, measured as in
``bench_merge_peer.py`` (wall with start-up, CPU, peak RSS of the process). Median of
``--repeat``. Both conversions stream (one slice at a time), so peak RSS should stay flat in the
number of layers (it is the process baseline, torch's libraries, plus a few slices).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_llama(path: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
               dtype_name: str, shard_bytes: int, seed: int = 0) -> int:
    """A random Hugging Face Llama directory at ``path``: ``config.json`` from transformers'
    ``LlamaConfig``, safetensors weights (sharded at ``shard_bytes`` with an index when larger)
    and a small fast tokenizer (tools such as mergekit load one). Returns the weight bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from btx_megatron.config import ModelConfig
    from btx_megatron.convert import mapping

    m = ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                    num_query_groups=kv_heads, vocab_size=vocab, untie_embeddings_and_output_weights=True,
                    swiglu=True, normalization="RMSNorm", position_embedding_type="rope", disable_bias_linear=True)
    dtype = getattr(torch, dtype_name)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards, current, size, total = [], {}, 0, 0
    for name, shape in mapping.hf_expected_shapes(mapping.Shapes.from_model_config(m)).items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
        total += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}))
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype_name
    config.to_json_file(str(path / "config.json"))
    _write_tokenizer(path)
    return total


def _write_tokenizer(path: Path) -> None:
    """A word-level fast tokenizer with Llama's special tokens (no download needed)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 3 + i for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(str(path))


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_merge_peer import _run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--ffn-hidden-size", type=int, default=1536)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--shard-mb", type=int, default=50, help="Shard size of the input and the export.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="Scratch directory (default: a temporary one).")
    args = parser.parse_args()

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    scratch.mkdir(parents=True, exist_ok=True)
    tool = str(ROOT / "tools" / "convert_hf.py")
    rows = []
    try:
        for layers in args.layers:
            d = scratch / f"L{layers}"
            nbytes = make_llama(d / "hf", layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                                args.num_query_groups, args.vocab_size, args.dtype, args.shard_mb * 10**6)
            cmds = {
                "import": [sys.executable, tool, "import", "--hf-dir", str(d / "hf"), "--output", str(d / "ckpt"),
                           "--overwrite", "--no-progress"],
                "export": [sys.executable, tool, "export", "--load", str(d / "ckpt"), "--output", str(d / "out"),
                           "--overwrite", "--no-progress", "--max-shard-size", f"{args.shard_mb}MB"],
                "copy": [sys.executable, str(ROOT / "benchmarks" / "bench_merge_peer.py"), "--copy", str(d / "hf"),
                         str(d / "copy")],
            }
            runs = {name: [] for name in cmds}
            _run(cmds["import"], d / "setup_import.log")  # the export needs a checkpoint
            for rep in range(args.repeat):
                for name, argv in cmds.items():
                    shutil.rmtree(d / "copy", ignore_errors=True)
                    runs[name].append(_run(argv, d / f"{name}_{rep}.log"))
            med = {n: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "peak_mib")}
                   for n, rs in runs.items()}
            rows.append((layers, nbytes / 1e6, med))
            shutil.rmtree(d)
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"(median of {args.repeat}; wall = whole command incl. start-up; MB/s = 2 x weight bytes (read + "
          "written) / wall; RSS = peak of the process)")
    print(f"{'layers':>6} {'MB':>8} | {'copy s':>7} {'MB/s':>6} | {'import s':>8} {'CPU s':>6} {'MB/s':>6} "
          f"{'RSS MiB':>8} | {'export s':>8} {'CPU s':>6} {'MB/s':>6} {'RSS MiB':>8}")
    for layers, mb, m in rows:
        c, i, e = m["copy"], m["import"], m["export"]
        print(f"{layers:>6} {mb:>8.1f} | {c['wall']:>7.2f} {2 * mb / c['wall']:>6.0f} | {i['wall']:>8.2f} "
              f"{i['cpu']:>6.2f} {2 * mb / i['wall']:>6.0f} {i['peak_mib']:>8.0f} | {e['wall']:>8.2f} "
              f"{e['cpu']:>6.2f} {2 * mb / e['wall']:>6.0f} {e['peak_mib']:>8.0f}")


if __name__ == "__main__":
    main()
