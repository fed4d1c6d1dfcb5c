"""Throughput of the UniMiSS pretraining datasets, ours and (with `--official DIR`) the official ones, in one process.

Data: `--n` int16 256×256×24 `.nii.gz` CT sub-volumes and `--n` 512² radiographs (half PNG, half JPEG) drawn from the
phantoms into a temporary folder, so compression is realistic. Each sample is two views, (1, 16, 96, 96) for CT and
(3, 224, 224) for X-rays, as `main.py` of the official code builds them. One thread per library (torch, OpenCV),
as in one DataLoader worker, so samples/s here is samples/s per worker.

Rounds: each round is one pass over the files by every dataset, the order alternating between rounds, so that a
burst of load from other processes hits both sides alike; the ratios are medians of the per-round ratios.
"wall" is samples per wall-clock second, "cpu" per CPU second of this process (what one worker on a core of its
own delivers; robust to other processes on a shared machine). `ours3d_cached` reads the uncompressed cache
(`Dataset3D(cache_dir=...)`), which its first, untimed pass builds: `cache_first_epoch_s` is that pass.

`--official DIR` is the `UniMiSS/` folder of YtongXie/UniMiSS-code (holding `data_loader3D.py`); its loaders need
`batchgenerators==0.21` (the version its README pins), `opencv-python-headless` and torchvision on the path. With a
CPU build of torch and the CUDA torchvision wheel, torchvision's compiled ops cannot load; the transforms the official
2D loader uses do not need them, so their registration is skipped in that case.

    python bench/bench_data.py                          # ours only
    python bench/bench_data.py --official DIR [--out bench/results/data_DATE.jsonl]
"""
import argparse, contextlib, io, json, math, os, random, statistics, sys, tempfile, time, types
from pathlib import Path

import numpy as np
import torch

from unimiss.data import (Dataset2D, Dataset3D, make_phantom_corpus, open_volume, phantom_xray, write_image,
                          write_list_file)

GPU_SAMPLES_PER_S = 9 * 24  # a GPU at the paper's batch: ~9 steps/s × 24 sub-volumes (issue 15)


def import_official(folder:str):
    "The official `Dataset3D` and `Dataset2D` classes from the `UniMiSS/` folder `folder`."
    if not os.path.isfile(os.path.join(folder, "data_loader3D.py")):
        sys.exit(f"bench_data: --official {folder}: data_loader3D.py not found there (give the UniMiSS/ folder)")
    sys.path.insert(0, folder)
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:  # the CUDA wheel's compiled ops with a CPU torch: not needed by the transforms
        if "torchvision::" not in str(e): raise
        for name in [m for m in sys.modules if m.startswith("torchvision")]: del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
    try:
        from data_loader2D import Dataset2D as Official2D
        from data_loader3D import Dataset3D as Official3D
    except ImportError as e:
        sys.exit(f"bench_data: the official loaders need {e.name} (pip install batchgenerators==0.21 "
                 f"opencv-python-headless; see --help): {e}")
    if "cv2" in sys.modules: sys.modules["cv2"].setNumThreads(1)  # OpenCV's resize would use every core
    return Official3D, Official2D


def make_data(folder:Path, n:int) -> dict:
    "The benchmark corpus: `n` CT sub-volumes and `n` radiographs (every other one a JPEG), with list files."
    corpus = make_phantom_corpus(folder, n_ct=n, n_xray=0 if n < 2 else n // 2, ct_shape=(256, 256, 24), xray_size=512)
    jpegs = [write_image(folder / "xray" / f"xray_{i:03d}.jpg", phantom_xray(512, 1000 + i)) for i in range(n - n // 2)]
    xray = [p for pair in zip(corpus["xray"], jpegs) for p in pair] + jpegs[len(corpus["xray"]):]
    return dict(ct=corpus["ct"], xray=xray, ct_list=corpus["ct_list"], xray_list=write_list_file(folder / "xray.txt", xray))


def one_pass(dataset) -> dict:
    "Samples/s of one pass over `dataset` (wall clock and CPU time of this process)."
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(len(dataset)): dataset[i]
    cpu = max(time.process_time() - cpu, 1e-6)  # the clock's resolution
    return {"wall": len(dataset) / (time.perf_counter() - wall), "cpu": len(dataset) / cpu}


def stage_times(files, cache_dir:Path, reps:int=2) -> dict:
    "CPU ms per 3D sample of each stage of ours: decode, base crop (from the decoded array / the cache), two views."
    from unimiss.data import CT_VIEWS, augment_ct
    ds, cached = Dataset3D(files, seed=0), Dataset3D(files, seed=0, cache_dir=cache_dir)
    rng = np.random.default_rng(0)
    def ms(f):
        t = time.process_time()
        for _ in range(reps):
            for p in ds.files: f(p)
        return 1e3 * (time.process_time() - t) / (reps * len(ds.files))
    base = ds.base_crop(ds.files[0], rng)
    return {"decode_ms": ms(open_volume), "decode_and_base_crop_ms": ms(lambda p: ds.base_crop(p, rng)),
            "cached_base_crop_ms": ms(lambda p: cached.base_crop(p, rng)),
            "two_views_ms": ms(lambda p: [augment_ct(base, v, ds.img_size, rng) for v in CT_VIEWS])}


def summarize(rounds:dict, official:bool) -> dict:
    "Medians over rounds of samples/s, and of the per-round ratios ours / official."
    out = {}
    for name, rs in rounds.items():
        for clock in ("wall", "cpu"):
            out[f"{name}_{clock}"] = round(statistics.median(r[clock] for r in rs), 2)
    if official:
        for ours, theirs in (("ours3d", "official3d"), ("ours3d_cached", "official3d"), ("ours2d", "official2d")):
            for clock in ("wall", "cpu"):
                ratios = [a[clock] / b[clock] for a, b in zip(rounds[ours], rounds[theirs])]
                out[f"speedup_{ours}_{clock}"] = round(statistics.median(ratios), 2)
    for name in rounds:  # one worker is one process on a core of its own: its rate is the CPU-time rate
        out[f"workers_per_gpu_{name}"] = math.ceil(GPU_SAMPLES_PER_S / out[f"{name}_cpu"])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", help="the official UniMiSS/ folder (contains data_loader3D.py)")
    p.add_argument("--n", type=int, default=12, help="files per modality")
    p.add_argument("--rounds", type=int, default=5, help="passes over the files per dataset, order alternating")
    p.add_argument("--out", help="append the result as one JSON line to this file")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args()
    if args.n < 2 or args.rounds < 1:
        p.error(f"--n must be at least 2 and --rounds at least 1, got --n {args.n} --rounds {args.rounds}")
    torch.set_num_threads(1)
    official = import_official(args.official) if args.official else None
    random.seed(0); np.random.seed(0)  # the official loaders draw from the global generators
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp / "data", args.n)
        datasets = {"ours3d": Dataset3D(data["ct_list"], seed=0),
                    "ours3d_cached": Dataset3D(data["ct_list"], seed=0, cache_dir=tmp / "cache"),
                    "ours2d": Dataset2D(data["xray_list"], seed=0)}
        t = time.perf_counter()
        one_pass(datasets["ours3d_cached"])  # builds the cache: the first epoch of a run with cache_dir
        cache_first_epoch_s = time.perf_counter() - t
        if official:
            with contextlib.redirect_stdout(io.StringIO()):  # the official constructors print
                datasets["official3d"] = official[0](f"{tmp / 'data'}/", "ct.txt", crop_size_3D=(16, 96, 96))
                datasets["official2d"] = official[1](f"{tmp / 'data'}/", "xray.txt", crop_size_2D=(224, 224))
            for a, b in (("ours3d", "official3d"), ("ours2d", "official2d")):  # the same samples, shape for shape
                shapes = [[tuple(v.shape) for v in datasets[k][0]] for k in (a, b)]
                if shapes[0] != shapes[1]: sys.exit(f"bench_data: {a} gives views {shapes[0]}, {b} {shapes[1]}")
        names = list(datasets)
        for name in names: datasets[name][0]  # warm-up: imports, first-call allocations
        rounds = {name: [] for name in names}
        for k in range(args.rounds):
            for name in (names if k % 2 == 0 else names[::-1]):
                rounds[name].append(one_pass(datasets[name]))
        stages = {k: round(v, 2) for k, v in stage_times(data["ct"][:4], tmp / "cache").items()}
    result = {"n_files": args.n, "rounds": args.rounds, **summarize(rounds, bool(official)),
              "cache_first_epoch_s": round(cache_first_epoch_s, 2), "ours3d_stages_cpu": stages,
              "gpu_samples_per_s": GPU_SAMPLES_PER_S, "torch": torch.__version__,
              "isal": _isal_version(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.out:
        with open(args.out, "a") as f: f.write(json.dumps(result) + "\n")
    if args.json:
        print(json.dumps(result)); return
    print(f"samples/s per worker (one thread), median of {args.rounds} rounds; load average "
          f"{load_before[0]:.1f} before, {result['loadavg_after'][0]:.1f} after")
    print(f"{'dataset':16}{'wall':>9}{'cpu':>9}{'× official wall':>17}{'× official cpu':>16}{'workers/GPU':>13}")
    for name in names:
        sp = "".join(f"{result.get(f'speedup_{name}_{c}', float('nan')):>{w}.2f}" for c, w in (("wall", 17), ("cpu", 16)))
        print(f"{name:16}{result[f'{name}_wall']:9.1f}{result[f'{name}_cpu']:9.1f}{sp if 'speedup_' + name + '_cpu' in result else ' ' * 33}"
              f"{result[f'workers_per_gpu_{name}']:13d}")
    print(f"workers/GPU: to feed {GPU_SAMPLES_PER_S} samples/s (~9 steps/s × 24 at the paper's batch) from the cpu rate")
    print(f"cache: first epoch (decode + write) {result['cache_first_epoch_s']:.2f} s for {args.n} files; "
          f"ours 3D stages, CPU ms per sample: {stages}")


def _isal_version():
    try:
        import isal
        return getattr(isal, "__version__", "installed")
    except ImportError:
        return None


if __name__ == "__main__":
    main()
