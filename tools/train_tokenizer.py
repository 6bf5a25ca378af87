"""Train a Llama-style sentencepiece tokenizer offline from local text files.

    python tools/train_tokenizer.py --input corpus.txt --model-prefix out/tokenizer --vocab-size 8000

Writes PREFIX.model and PREFIX.vocab (unk=0, bos=1, eos=2, no pad, byte fallback);
see btx_megatron/data/tokenizer_training.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="plain-text files, one sentence per line")
    parser.add_argument("--model-prefix", required=True)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000, help="sentences sampled (0: all)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from btx_megatron.data.tokenizer_training import TokenizerTrainingConfig, train_sentencepiece

    try:
        path = train_sentencepiece(
            TokenizerTrainingConfig(
                input=args.input,
                model_prefix=args.model_prefix,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                character_coverage=args.character_coverage,
                input_sentence_size=args.input_sentence_size,
                seed=args.seed,
                num_threads=args.num_threads,
            )
        )
    except (ValueError, RuntimeError) as err:  # sentencepiece reports bad settings as RuntimeError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
