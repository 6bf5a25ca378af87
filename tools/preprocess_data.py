"""Tokenise JSONL / text files into a Megatron indexed dataset (.bin/.idx + .meta.json).

    python tools/preprocess_data.py --input data/math.jsonl --output-prefix data/math \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model \
        --append-eod --workers 2

Flags follow Megatron-LM's tools/preprocess_data.py; see btx_megatron/data/preprocess.py.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL or .txt files, or glob patterns")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys to tokenise (default: text)")
    parser.add_argument("--tokenizer-type", required=True, choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    parser.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file or HF tokenizer directory")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes")
    parser.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    parser.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from btx_megatron.data.preprocess import PreprocessConfig, preprocess

    try:
        result = preprocess(
            PreprocessConfig(
                input=args.input,
                output_prefix=args.output_prefix,
                tokenizer_type=args.tokenizer_type,
                tokenizer_model=args.tokenizer_model,
                json_keys=args.json_keys,
                workers=args.workers,
                append_eod=args.append_eod,
                log_interval=args.log_interval,
                strict=args.strict,
            )
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for prefix in result.output_prefixes.values():
        print(f"wrote {prefix}.bin/.idx: {result.num_documents} documents, {result.num_tokens} tokens, "
              f"{result.num_skipped} bad records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
