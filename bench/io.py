"""Reader -> writer throughput and memory: an identity pass over SmolLM2-135M vs `cp` of the same files.

Run: .venv/bin/python bench/io.py [--repeats 3]
Each trial runs `cp -r` and `weightsmith copy` as whole processes, alternating, on a warm page cache.
The identity pass reports its own copy time (reader -> writer, excluding Python/torch start-up) on
stdout; wall time and peak RSS are those of the whole process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import VENV_BIN, measure, median  # noqa: E402

COPY_SCRIPT = """
import sys, time, json
from weightsmith.checkpoint import Checkpoint, copy_checkpoint
from weightsmith.provenance import Record
src = Checkpoint(sys.argv[1])
record = Record("copy", {})
record.add_input(src.folder, src.files, src.provenance)
t = time.perf_counter()
copy_checkpoint(src, sys.argv[2], record=record)
print(json.dumps({"copy_s": time.perf_counter() - t}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the demo model)")
    args = parser.parse_args()
    from weightsmith.checkpoint import Checkpoint
    from weightsmith.demo import fetch_demo_model

    model = args.model or fetch_demo_model()
    ckpt = Checkpoint(model)
    total = sum(f.stat().st_size for f in ckpt.files)
    largest_mb = max(t.nbytes for t in ckpt.tensors.values()) / 2**20
    subprocess.run(["cat", *map(str, ckpt.files)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    rows = {"cp": [], "ws_process": [], "ws_copy": [], "ws_rss": [], "cp_rss": []}
    with tempfile.TemporaryDirectory(prefix="ws-bench-io-", dir=model.parent) as tmp:
        for i in range(args.repeats):
            cp = measure(["cp", "-r", str(model), f"{tmp}/cp{i}"])
            ws = measure([str(VENV_BIN / "python"), "-c", COPY_SCRIPT, str(model), f"{tmp}/ws{i}"])
            rows["cp"].append(cp.wall_s)
            rows["cp_rss"].append(cp.peak_rss_mb)
            rows["ws_process"].append(ws.wall_s)
            rows["ws_copy"].append(json.loads(ws.stdout)["copy_s"])
            rows["ws_rss"].append(ws.peak_rss_mb)
            shutil.rmtree(f"{tmp}/cp{i}")
            shutil.rmtree(f"{tmp}/ws{i}")
    cp_s, copy_s, proc_s = median(rows["cp"]), median(rows["ws_copy"]), median(rows["ws_process"])
    rss = median(rows["ws_rss"])
    result = {
        "model": str(model),
        "bytes": total,
        "largest_tensor_mb": round(largest_mb, 1),
        "cp_s": round(cp_s, 3),
        "weightsmith_copy_s": round(copy_s, 3),
        "weightsmith_process_s": round(proc_s, 3),
        "throughput_ratio_copy": round(cp_s / copy_s, 2),
        "throughput_ratio_process": round(cp_s / proc_s, 2),
        "weightsmith_peak_rss_mb": round(rss, 1),
        "rss_goal_mb": round(largest_mb + 300, 1),
        "cp_peak_rss_mb": round(median(rows["cp_rss"]), 1),
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
