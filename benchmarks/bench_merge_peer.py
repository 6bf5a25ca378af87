"""Peer benchmark: this project's merge against mergekit-moe 0.1.5 on the same Hugging Face models.

    python benchmarks/bench_merge_peer.py --install-mergekit            # first run: builds mergekit's venv
    python benchmarks/bench_merge_peer.py --layers 12 --repeat 3        # ~220M-parameter bf16 Llamas
    python benchmarks/bench_merge_peer.py --layers 24 --repeat 3        # 2x the layers

What it does, in one run:
1. makes ``--models`` random Hugging Face Llama models (bf16; the last is the seed) with
   transformers' ``LlamaConfig`` and a small tokenizer, and imports each with
   ``tools/convert_hf.py import`` (once, as set-up);
2. then ``--repeat`` times, in rotating order so no tool always runs first (warm page cache for
   all: every input was just written or read):
   * ``mergekit-moe`` (its own venv, never a project requirement): base model = the seed,
     experts = the branches and the seed, ``gate_mode: random``, top-2, bf16;
   * ``tools/merge_branches.py`` as 1 process, under ``torchrun`` with 2 (``--worlds``) and as
     1 process forking 2 workers (``--workers``): experts = the branches and the seed
     (``--seed-expert``), averages over the branches;
   * ``tools/convert_hf.py import`` of one model (the per-model set-up cost of our path);
   * a plain user-space copy of our merged output (read + write + fsync of every file);
3. prints, per tool, the median wall time (whole command, process start-up included), CPU
   time (user + system, all its processes: on a shared machine wall time follows it), peak
   RSS per process (the largest process of the command's tree, ``RUSAGE_CHILDREN``), MB/s of
   bytes read + written, and for our merge the data phase it reports itself (read + compute +
   write, start-up excluded) against the plain copy's throughput; plus the load average.

Bytes read + written: the merge and mergekit must read the seed's non-FFN tensors or every
branch's (ours averages them), every expert's FFN, and write the output; the copy reads and
writes the output. mergekit-moe is installed with ``--install-mergekit`` into
``<--cache>/mergekit-0.1.5`` (a Python 3.11 venv with the CPU torch wheel; see
:func:`install_mergekit`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "btx-megatron"
MERGEKIT = "mergekit==0.1.5"
MERGEKIT_PYTHON = ("python3.11", "/root/.pyenv/versions/3.11.7/bin/python3.11")
MERGE_LINE = re.compile(r"\[merge\] read ([\d,.]+) MiB, wrote ([\d,.]+) MiB in ([\d.]+) s")


# --------------------------------------------------------------------------------------------
# Child-process modes (no torch import): measured command runner and plain copy
# --------------------------------------------------------------------------------------------


def _measure(argv: list[str]) -> None:
    """Run ``argv``; print wall seconds and the peak RSS of its largest process (JSON, last line)."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys.stdout.write(proc.stdout)
    print(json.dumps({"rc": proc.returncode, "wall": wall, "peak_mib": usage.ru_maxrss / 1024,
                      "cpu": usage.ru_utime + usage.ru_stime}))


def _copy_tree(src: str, dst: str) -> None:
    """User-space copy (16 MiB reads and writes, fsync per file): a disk-speed floor, not a
    block-sharing ``copy_file_range``."""
    for f in sorted(Path(src).rglob("*")):
        target = Path(dst) / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
            fout.flush()
            os.fsync(fout.fileno())


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def install_mergekit(venv: Path) -> Path:
    """A venv with mergekit 0.1.5 and the CPU torch 2.13 wheel (Python 3.11: the wheel the
    package index serves from local disk), away from the project's environment. Returns
    ``mergekit-moe``."""
    exe = venv / "bin" / "mergekit-moe"
    if exe.exists():
        return exe
    python = next((p for p in MERGEKIT_PYTHON if shutil.which(p) or Path(p).exists()), None)
    if python is None:
        raise SystemExit("mergekit needs a Python 3.11 interpreter (python3.11) for the CPU torch wheel.")
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", MERGEKIT], check=True)
    return exe


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def make_models(work: Path, args) -> list[Path]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_convert import make_llama

    names = [f"branch{i}" for i in range(args.models - 1)] + ["seed"]
    paths = []
    for i, name in enumerate(names):
        path = work / "hf" / name
        if not (path / "config.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            make_llama(path, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab,
                       "bfloat16", 5 << 30, seed=i)
        paths.append(path)
    return paths


def _run(argv: list[str], log: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", *argv], capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed (rc {result['rc']}); see {log}")
    m = MERGE_LINE.search(out.stdout)
    if m:
        read, wrote, secs = (float(x.replace(",", "")) for x in m.groups())
        result["data"] = {"read_mib": read, "written_mib": wrote, "seconds": secs}
    return result


def _import_all(work: Path, hf: list[Path]) -> list[Path]:
    roots = []
    for path in hf:
        root = work / "ckpt" / path.name
        if not (root / "latest_checkpointed_iteration.txt").exists():
            shutil.rmtree(root, ignore_errors=True)
            _run([sys.executable, str(ROOT / "tools" / "convert_hf.py"), "import", "--hf-dir", str(path),
                  "--output", str(root), "--no-progress"], work / "logs" / f"import_{path.name}.log")
        roots.append(root)
    return roots


def _mergekit_config(work: Path, hf: list[Path]) -> Path:
    lines = [f"base_model: {hf[-1]}", "gate_mode: random", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    lines += [f"  - source_model: {p}" for p in hf]
    cfg = work / "mergekit-moe.yml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _bytes_moved(hf_seed: Path, ckpt: list[Path]) -> dict[str, int]:
    """Bytes each merge must read: FFN tensors of every expert, plus the non-FFN tensors of the
    seed (mergekit copies them) or of every branch (ours averages them)."""
    from safetensors import safe_open

    ffn = other = 0
    for f in hf_seed.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 2
                for d in sl.get_shape():
                    n *= d
                if ".mlp." in k:
                    ffn += n
                else:
                    other += n
    experts = len(ckpt)
    return {"mergekit": other + experts * ffn, "ours": (experts - 1) * other + experts * ffn}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _commands(work: Path, hf: list[Path], ckpt: list[Path], args, mergekit: Path | None) -> dict[str, tuple]:
    out = work / "out"
    branches = [a for p in ckpt[:-1] for a in ("--branch", f"{p.name}={p}")]
    merge = [str(ROOT / "tools" / "merge_branches.py"), *branches, "--seed-expert", str(ckpt[-1]),
             "--moe-router-topk", "2", "--overwrite"]
    cmds: dict[str, tuple] = {}
    if mergekit is not None:
        cmds["mergekit-moe"] = ([str(mergekit), str(_mergekit_config(work, hf)), str(out / "mergekit"),
                                 *args.mergekit_args], out / "mergekit")
    for w in args.worlds:
        dest = out / f"merge_w{w}"
        if w == 1:
            cmds["merge W=1"] = ([sys.executable, *merge, "--output", str(dest)], dest)
        else:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w)]
            cmds[f"merge W={w}"] = ([*torchrun, *merge, "--output", str(dest)], dest)
    for n in args.workers:
        dest = out / f"merge_workers{n}"
        cmds[f"merge --workers {n}"] = ([sys.executable, *merge, "--workers", str(n), "--output", str(dest)], dest)
    cmds["import 1 model"] = ([sys.executable, str(ROOT / "tools" / "convert_hf.py"), "import", "--hf-dir",
                               str(hf[0]), "--output", str(out / "import"), "--overwrite", "--no-progress"],
                              out / "import")
    cmds["copy of merge output"] = ([sys.executable, __file__, "--copy", str(out / "merge_w1"), str(out / "copy")],
                                    out / "copy")
    return cmds


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        return _measure(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--copy":
        return _copy_tree(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=4, help="models: N-1 branches and the seed")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="1: one process; N: torchrun with N")
    ap.add_argument("--workers", type=int, nargs="*", default=[2], help="one process forking N workers (--workers N)")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: <cache>/bench_merge_peer)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--install-mergekit", action="store_true", help="create mergekit's venv if missing")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-args", nargs="*", default=[], help="extra mergekit-moe flags")
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = ap.parse_args()

    venv = args.cache / "mergekit-0.1.5"
    mergekit = None
    if not args.skip_mergekit:
        if args.install_mergekit:
            mergekit = install_mergekit(venv)
        elif (venv / "bin" / "mergekit-moe").exists():
            mergekit = venv / "bin" / "mergekit-moe"
        else:
            raise SystemExit(f"mergekit-moe is not installed in {venv}; pass --install-mergekit (or --skip-mergekit).")
    tag = f"L{args.layers}_H{args.hidden}_F{args.ffn}_V{args.vocab}_N{args.models}"
    work = (args.work or args.cache / "bench_merge_peer") / tag
    (work / "logs").mkdir(parents=True, exist_ok=True)
    hf = make_models(work, args)
    ckpt = _import_all(work, hf)
    cmds = _commands(work, hf, ckpt, args, mergekit)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    names = list(cmds)
    for rep in range(args.repeat):
        order = names[rep % len(names):] + names[:rep % len(names)]
        if "copy of merge output" in order and "merge W=1" in order:  # the copy needs a merge output
            order.remove("copy of merge output")
            order.insert(order.index("merge W=1") + 1, "copy of merge output")
        for name in order:
            argv, dest = cmds[name]
            r = _run(argv, work / "logs" / f"{name.replace(' ', '_').replace('=', '')}_{rep}.log")
            r["output_bytes"] = _dir_bytes(dest)
            runs[name].append(r)
            print(f"rep {rep} {name}: {r['wall']:.1f} s, peak {r['peak_mib']:.0f} MiB", flush=True)
            if name != "merge W=1":  # kept for the copy, which runs next and removes both
                shutil.rmtree(dest, ignore_errors=True)
            if name.startswith("copy"):
                shutil.rmtree(cmds["merge W=1"][1], ignore_errors=True)
    load_after = os.getloadavg()
    _report(runs, _bytes_moved(hf[-1], ckpt), hf, args, load_before, load_after)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"work": str(work), "cache": str(args.cache),
                                                               "json": str(args.json)},
                                         "runs": runs, "load": [load_before, load_after]}, indent=2, default=str))


def _report(runs: dict, moved: dict, hf: list[Path], args, load_before, load_after) -> None:
    model_mb = _dir_bytes(hf[0]) / 1e6
    print(f"\n{args.models} bf16 Llama models of {model_mb:.0f} MB ({args.layers} layers, hidden {args.hidden}, "
          f"FFN {args.ffn}, vocab {args.vocab}); {args.repeat} alternating repetitions; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min), {os.cpu_count()} cores")
    print(f"{'tool':<22} {'median s':>9} {'min-max s':>13} {'CPU s':>7} {'peak RSS/proc MiB':>18} "
          f"{'read+written MB':>16} {'MB/s':>8} {'data phase s':>13} {'data MB/s':>10}")
    copy_rate = None
    rows = []
    for name, rs in runs.items():
        if not rs:
            continue
        walls = [r["wall"] for r in rs]
        out = statistics.median(r["output_bytes"] for r in rs)
        if name == "mergekit-moe":
            moved_b = moved["mergekit"] + out
        elif name.startswith("merge"):
            moved_b = moved["ours"] + out
        elif name.startswith("import"):
            moved_b = 2 * _dir_bytes(hf[0])
        else:
            moved_b = 2 * out
        wall = statistics.median(walls)
        data_s = data_rate = None
        if all("data" in r for r in rs):
            data_s = statistics.median(r["data"]["seconds"] for r in rs)
            data_rate = statistics.median((r["data"]["read_mib"] + r["data"]["written_mib"]) * 2**20 / 1e6
                                          / r["data"]["seconds"] for r in rs)
        if name.startswith("copy"):
            data_s, data_rate = wall, moved_b / 1e6 / wall
            copy_rate = data_rate
        rows.append((name, wall, min(walls), max(walls), statistics.median(r["peak_mib"] for r in rs),
                     moved_b / 1e6, moved_b / 1e6 / wall, data_s, data_rate, statistics.median(r["cpu"] for r in rs)))
    for name, wall, lo, hi, peak, mb, rate, data_s, data_rate, cpu in rows:
        ds = f"{data_s:13.2f}" if data_s is not None else f"{'-':>13}"
        dr = f"{data_rate:10.0f}" if data_rate is not None else f"{'-':>10}"
        print(f"{name:<22} {wall:9.1f} {lo:6.1f}-{hi:<6.1f} {cpu:7.1f} {peak:18.0f} {mb:16.0f} {rate:8.0f} {ds} {dr}")
    mk = next((r for r in rows if r[0] == "mergekit-moe"), None)
    for r in rows:
        if r[0].startswith("merge "):
            notes = []
            if mk:
                notes.append(f"{r[1] / mk[1]:.2f}x mergekit-moe's wall, peak RSS {r[4] / mk[4]:.2f}x")
            if copy_rate and r[8]:
                notes.append(f"data phase at {100 * r[8] / copy_rate:.0f}% of the copy's MB/s")
            print(f"{r[0]}: " + "; ".join(notes))


if __name__ == "__main__":
    main()
