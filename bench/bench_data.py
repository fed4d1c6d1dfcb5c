"""Throughput of the UniMiSS datasets: samples/s in one process with one torch thread.

Data as the official loaders were measured on: 20 int16 256×256×24 `.nii.gz` CT sub-volumes and 20
512² 8-bit PNG radiographs, generated from the phantoms in a temporary folder (so compression is
realistic). Each sample is two views: (1, 16, 96, 96) for CT, (3, 224, 224) for X-ray.

    python bench/bench_data.py            # a table
    python bench/bench_data.py --json     # one JSON line
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from unimiss.data import Dataset2D, Dataset3D, make_phantom_corpus, open_volume, read_image

# measured with the official loaders (UniMiSS/data_loader{2D,3D}.py) on the same data and machine
OFFICIAL = {"dataset3d": 14.6, "dataset2d": 18.6}


def rates(run, n:int) -> dict:
    "Items/s of `n` items done by `run()`: per wall-clock second and per CPU second of this process."
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return {"wall": n / (time.perf_counter() - wall), "cpu": n / (time.process_time() - cpu)}


def samples_per_second(dataset, epochs:int) -> dict:
    "Samples/s over `epochs` passes, after one untimed warm-up item."
    dataset[0]
    return rates(lambda: [dataset[i] for _ in range(epochs) for i in range(len(dataset))], epochs * len(dataset))


def reads_per_second(read, files, epochs:int) -> dict:
    return rates(lambda: [read(f) for _ in range(epochs) for f in files], epochs * len(files))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="files per modality")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes over the files")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_phantom_corpus(tmp, n_ct=args.n, n_xray=args.n, ct_shape=(256, 256, 24), xray_size=512)
        cached = Dataset3D(corpus["ct_list"], cache_dir=Path(tmp) / "cache", seed=0)
        start = time.perf_counter()
        cached.build_cache(progress=False)
        cache_build = time.perf_counter() - start
        results = {
            "dataset3d": samples_per_second(Dataset3D(corpus["ct_list"], seed=0), args.epochs),
            "dataset3d_cached": samples_per_second(cached, args.epochs),
            "dataset2d": samples_per_second(Dataset2D(corpus["xray_list"], seed=0), args.epochs),
            "read3d": reads_per_second(open_volume, corpus["ct"], args.epochs),
            "read2d": reads_per_second(read_image, corpus["xray"], args.epochs),
            "cache_build_s": cache_build,
        }
    # "wall" is what a training run sees; "cpu" (per CPU-second of this process) is robust to other
    # processes competing for the cores, and equals "wall" on an idle machine
    flat = {"cache_build_s": round(results.pop("cache_build_s"), 2)}
    for name, r in results.items():
        for clock, v in r.items():
            flat[f"{name}_{clock}"] = round(v, 2)
    for clock in ("wall", "cpu"):
        flat[f"speedup3d_{clock}"] = round(flat[f"dataset3d_{clock}"] / OFFICIAL["dataset3d"], 2)
        flat[f"speedup3d_cached_{clock}"] = round(flat[f"dataset3d_cached_{clock}"] / OFFICIAL["dataset3d"], 2)
        flat[f"speedup2d_{clock}"] = round(flat[f"dataset2d_{clock}"] / OFFICIAL["dataset2d"], 2)
    flat["official"] = OFFICIAL
    if args.json:
        print(json.dumps(flat))
    else:
        for k, v in flat.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
