"""Step 2a: download the paper's domain sources to JSONL ({"text": ...} per line).

    pip install datasets               # on a host with internet access
    python examples/llama2_7b/02_prepare_data.py --out $RAW --tokens 2e9   # per domain, ~4 chars/token

Sources (the BTX paper's choices; check each dataset's licence and terms):
  math  EleutherAI/proof-pile-2 (arxiv, open-web-math, algebraic-stack), as Llemma
  code  bigcode/the-stack-dedup (Python, C++, Java, ...; needs accepting the terms on the Hub)
  wiki  wikimedia/wikipedia 20231101.en
  seed  a general web sample standing in for Llama-2's (unreleased) pretraining data:
        cerebras/SlimPajama-627B
Every 200th document goes to the validation file.
"""

import argparse
import json
import os

SOURCES = {
    "math": [("EleutherAI/proof-pile-2", "default", "text")],
    "code": [("bigcode/the-stack-dedup", None, "content")],
    "wiki": [("wikimedia/wikipedia", "20231101.en", "text")],
    "seed": [("cerebras/SlimPajama-627B", None, "text")],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=float, default=2e9, help="approximate tokens per domain")
    p.add_argument("--domains", nargs="+", default=list(SOURCES))
    args = p.parse_args()
    from datasets import load_dataset

    os.makedirs(args.out, exist_ok=True)
    for domain in args.domains:
        budget_chars = int(args.tokens * 4)
        chars = 0
        with open(f"{args.out}/{domain}_train.jsonl", "w") as train, open(f"{args.out}/{domain}_valid.jsonl", "w") as valid:
            for name, config, key in SOURCES[domain]:
                ds = load_dataset(name, config, split="train", streaming=True)
                for i, row in enumerate(ds):
                    text = row[key]
                    (valid if i % 200 == 199 else train).write(json.dumps({"text": text}) + "\n")
                    chars += len(text)
                    if i % 100_000 == 0:
                        print(f"{domain}: {i:,} documents, {chars / 4e9:.2f}B tokens (approx.)", flush=True)
                    if chars >= budget_chars:
                        break
        print(f"{domain}: done, ~{chars / 4e9:.2f}B tokens")


if __name__ == "__main__":
    main()
