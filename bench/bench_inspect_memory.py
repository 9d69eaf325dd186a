"""Peak resident memory and time of ``inspect`` on memory-hostile uploads, against a baseline revision.

Issue 17 found ``inspect`` peaking at 7.0 GB on twelve PNGs just under the pixel limit and at 7.5 GB on
six 16-bit grey PNGs. This bench makes such a set at bench time (flat PNGs streamed through zlib: ~0.2 MB
each on disk, 64 megapixels decoded), then runs ``python -m tl_core inspect --json`` on it with this
checkout and with a baseline revision of ``tl_core`` (``git archive``, default: the commit before issue
17's changes), in the same run, each in a fresh process whose peak RSS is its own (``ru_maxrss`` of a
wrapper's only child). More datasets can be given as arguments (e.g. ``../shared/datasets/hymenoptera``).

Prints one line per dataset and one JSON line::

    {"datasets": {"hostile": {"new": {"peak_mb": ..., "seconds": ...}, "baseline": {...},
                  "peak_ratio": baseline/new, "time_ratio": baseline/new}, ...}}

Usage::

    python bench/bench_inspect_memory.py                              # 4 near-limit + 3 16-bit PNGs
    python bench/bench_inspect_memory.py --big 12 --grey 6            # the issue's full set (baseline ~7 GB!)
    python bench/bench_inspect_memory.py ../shared/datasets/hymenoptera --no-hostile

The baseline may need several GB on the hostile set: run it where that memory is free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

#: The last commit before issue 17's changes to the data path.
BASELINE = "7921b6d"

_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run([sys.executable, '-m', 'tl_core', 'inspect', sys.argv[1], '--json'], capture_output=True)\n"
    "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)\n"
)


def make_hostile(folder: Path, big: int, grey: int) -> Path:
    from corpus import flat_png, retag_png

    (folder / "big").mkdir(parents=True)
    (folder / "grey16").mkdir()
    png = flat_png(8000, 7990)
    for i in range(big):
        (folder / "big" / f"big_{i}.png").write_bytes(retag_png(png, b"big%d" % i))
    png = flat_png(8000, 7990, bit_depth=16, grey=True, value=200)
    for i in range(grey):
        (folder / "grey16" / f"grey_{i}.png").write_bytes(retag_png(png, b"grey%d" % i))
    return folder


def measure(src: Path, data: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFER_STUDIO_CACHE=str(data.parent / "cache"))
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(data)], cwd=src, env=env, capture_output=True,
                          text=True, timeout=3600)
    rc, peak_kb, seconds = proc.stdout.split()
    return {"ok": rc == "0", "peak_mb": round(int(peak_kb) / 1024, 1), "seconds": round(float(seconds), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", help="more dataset folders, zips or CSVs to inspect")
    parser.add_argument("--big", type=int, default=4, help="PNGs just under the pixel limit (default 4)")
    parser.add_argument("--grey", type=int, default=3, help="16-bit grey PNGs of 64 megapixels (default 3)")
    parser.add_argument("--no-hostile", action="store_true", help="only the datasets given")
    parser.add_argument("--baseline", default=BASELINE, help=f"git revision of the baseline (default {BASELINE})")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as tmp:
        tmp = Path(tmp)
        old = tmp / "baseline"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline, "tl_core"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        sets = {} if args.no_hostile else {"hostile": make_hostile(tmp / "hostile" / "data", args.big, args.grey)}
        sets.update({d: Path(d).resolve() for d in args.datasets})
        out = {}
        for name, data in sets.items():
            row = {"new": measure(ROOT, data), "baseline": measure(old, data)}
            row["peak_ratio"] = round(row["baseline"]["peak_mb"] / row["new"]["peak_mb"], 2)
            row["time_ratio"] = round(row["baseline"]["seconds"] / row["new"]["seconds"], 2)
            out[name] = row
            print(f"{name}: peak {row['new']['peak_mb']} MB (baseline {row['baseline']['peak_mb']} MB, "
                  f"{row['peak_ratio']}x), {row['new']['seconds']} s (baseline {row['baseline']['seconds']} s, "
                  f"{row['time_ratio']}x)", file=sys.stderr)
        print(json.dumps({"datasets": out, "baseline": args.baseline, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))


if __name__ == "__main__":
    main()
