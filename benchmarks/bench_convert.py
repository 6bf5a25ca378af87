"""Hugging Face conversion throughput and peak memory (CPU).

    python benchmarks/bench_convert.py                       # 4 and 8 layers, hidden 512
    python benchmarks/bench_convert.py --layers 4 8 16 --hidden-size 1024 --dtype bfloat16

For each depth: a synthetic Llama directory (random weights, safetensors shards) is converted
with ``tools/convert_hf.py import`` and the result exported again with ``export``, each in a
fresh process whose wall time and peak RSS (ru_maxrss) are measured. The baseline is a plain
copy of the same weight files, and the RSS of a process that only imports the libraries.
Expected shape: export peak RSS flat in the number of layers (it streams one layer at a
time); import holds one copy of the model (grows with layers).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(argv: list[str]) -> None:
    """Run one conversion (or only the imports) in this process; print time and peak RSS."""
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_hf
    import megatron.core  # noqa: F401
    import torch  # noqa: F401

    from btx_megatron.convert import hf_export, hf_import  # noqa: F401
    from btx_megatron.models import build_model_chunks  # noqa: F401

    # Timed: the conversion itself (library imports are done above, as in any long-lived process).
    start = time.perf_counter()
    if argv != ["noop"]:
        rc = convert_hf.main(argv)
        assert rc == 0, rc
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "max_rss_mb": rss_mb}))


def _run(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def _copy_seconds(src: Path, dst: Path) -> float:
    dst.mkdir()
    start = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    return time.perf_counter() - start


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--ffn-hidden-size", type=int, default=1536)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--shard-mb", type=int, default=50, help="Shard size of the input and the export.")
    parser.add_argument("--workdir", default=None, help="Scratch directory (default: a temporary one).")
    args = parser.parse_args()

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    scratch.mkdir(parents=True, exist_ok=True)
    base = _run(["noop"])
    print(f"baseline process (imports only): peak RSS {base['max_rss_mb']:.0f} MB")
    rows = []
    try:
        for layers in args.layers:
            d = scratch / f"L{layers}"
            nbytes = make_llama(d / "hf", layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                                args.num_query_groups, args.vocab_size, args.dtype, args.shard_mb * 10**6)
            copy_s = _copy_seconds(d / "hf", d / "copy")
            imp = _run(["import", "--hf-dir", str(d / "hf"), "--output", str(d / "ckpt"), "--no-progress"])
            exp = _run(["export", "--load", str(d / "ckpt"), "--output", str(d / "out"), "--no-progress",
                        "--max-shard-size", f"{args.shard_mb}MB"])
            mb = nbytes / 1e6
            rows.append((layers, mb, mb / copy_s, mb / imp["seconds"], mb / exp["seconds"],
                         imp["max_rss_mb"], exp["max_rss_mb"]))
            shutil.rmtree(d)
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print("(throughput = weight bytes / wall time of the conversion call; library imports excluded, "
          "model build, process-group set-up and the checkpoint save included)")
    print(f"{'layers':>6} {'MB':>8} {'copy MB/s':>10} {'import MB/s':>12} {'export MB/s':>12} "
          f"{'import RSS MB':>14} {'export RSS MB':>14}")
    for r in rows:
        print(f"{r[0]:>6} {r[1]:>8.1f} {r[2]:>10.1f} {r[3]:>12.1f} {r[4]:>12.1f} {r[5]:>14.0f} {r[6]:>14.0f}")
    if len(rows) >= 2:
        (l0, *_, e0), (l1, *_, e1) = rows[0], rows[-1]
        i0, i1 = rows[0][5], rows[-1][5]
        print(f"export peak RSS {l0} -> {l1} layers: {e0:.0f} -> {e1:.0f} MB ({e1 - e0:+.0f} MB); "
              f"import: {i0:.0f} -> {i1:.0f} MB ({i1 - i0:+.0f} MB)")


if __name__ == "__main__":
    main()
