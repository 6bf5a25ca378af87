"""Build the built-in BTX corpora (math, code, wiki) offline: JSONL, tokenizer, indexed datasets.

    python tools/build_corpora.py --output data/btx_corpora            # >= 2M train tokens per domain
    python tools/build_corpora.py --output /tmp/tiny --tokens-per-domain 50000 --vocab-size 2000

Writes DIR/jsonl/{domain}_{train,valid}.jsonl, DIR/tokenizer/tokenizer.model,
DIR/data/{domain}_{train,valid}.bin/.idx and DIR/manifest.json; re-running with the same flags
skips work that is already done. See btx_megatron/data/documents.py for the sources.
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--tokens-per-domain", type=int, default=2_000_000, help="minimum train tokens per domain")
    parser.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary size")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workers", type=int, default=2, help="processes/threads (does not change the output)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from btx_megatron.data.corpora import CorporaConfig, build_corpora

    try:
        manifest = build_corpora(
            CorporaConfig(
                output=args.output,
                tokens_per_domain=args.tokens_per_domain,
                vocab_size=args.vocab_size,
                seed=args.seed,
                workers=args.workers,
            )
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {d: {s: v["num_tokens"] for s, v in splits.items()} for d, splits in manifest["domains"].items()}
    print(json.dumps({"output": args.output, "tokens": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
