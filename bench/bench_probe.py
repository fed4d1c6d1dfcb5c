"""Speed of the frozen-feature probe (issue 10 target: features of 1,000 2D images at 64² in <= 30 s on 2 cores, MiT-tiny).

Times the probe's own code (`unimiss.evaluate`): `xray_input` (decode and resize each image, as `load_probe` does) and
`extract_features` (a frozen MiT-tiny from `probe_backbone(... 'random')`: the cost does not depend on the weights),
on 1,000 Br35H images from the sample cache (synthetic PNGs when the cache has no Br35H), with `--threads` torch
threads; each timing is the median of `--repeats` runs.

    python bench/bench_probe.py                 # prints the times, writes bench/results/probe_speed_<date>.json
    python bench/bench_probe.py --n 100 --repeats 1 --no-save   # a quick look
"""
import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unimiss.data import atomic_write
from unimiss.evaluate import extract_features, probe_backbone, xray_input

TARGET_S = 30.0


def images(n:int) -> tuple[list[Path], str]:
    "`n` Br35H JPEGs of the sample cache, else `n` synthetic 256² PNGs in a temporary folder; and which."
    from unimiss.samples import data_dir
    found = sorted((data_dir(None)/'sources'/'br35h').glob('*/*.jpg'))
    if len(found) >= n: return found[::len(found) // n][:n], 'br35h'
    from PIL import Image
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp/f'{i:04d}.png'
        Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths, 'synthetic'


def median_time(fn, repeats:int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=1000, help='images (default 1000)')
    p.add_argument('--size', type=int, default=64, help='input size (default 64)')
    p.add_argument('--arch', default='tiny')
    p.add_argument('--threads', type=int, default=2, help='torch threads (default 2)')
    p.add_argument('--repeats', type=int, default=3, help='median of this many runs (default 3)')
    p.add_argument('--batch-size', type=int, default=64, help="extract_features' batch size (default 64, the probe's)")
    p.add_argument('--no-save', action='store_true', help='do not write bench/results/probe_speed_<date>.json')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    paths, source = images(a.n)
    model = probe_backbone('random', a.arch, 2, a.size)
    decode_s, decode_all, x = median_time(lambda: torch.stack([xray_input(q, a.size) for q in paths]), a.repeats)
    extract_features(model, x[:a.batch_size], batch_size=a.batch_size)  # warm-up (first-call allocations)
    feat_s, feat_all, f = median_time(lambda: extract_features(model, x, batch_size=a.batch_size), a.repeats)
    total = decode_s + feat_s
    res = dict(bench='probe_speed', n_images=len(paths), source=source, img_size=a.size, arch=a.arch, threads=a.threads,
               batch_size=a.batch_size, repeats=a.repeats, decode_s=round(decode_s, 2), features_s=round(feat_s, 2),
               total_s=round(total, 2), decode_runs_s=[round(t, 2) for t in decode_all],
               features_runs_s=[round(t, 2) for t in feat_all], feature_shape=list(f.shape), target_s=TARGET_S,
               ratio_to_target=round(total / TARGET_S, 3), passed=total <= TARGET_S, torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
    print(f"{len(paths)} {source} images at {a.size}², MiT-{a.arch}, {a.threads} threads, median of {a.repeats}: "
          f"decode+resize {decode_s:.2f} s, features {feat_s:.2f} s, total {total:.2f} s = "
          f"{total / TARGET_S:.2f} × the {TARGET_S:g} s target ({'met' if res['passed'] else 'NOT met'})")
    if not a.no_save:
        out = Path(__file__).resolve().parent/'results'/f"probe_speed_{datetime.date.today().isoformat()}.json"
        atomic_write(out, (json.dumps(res, indent=1) + '\n').encode())
        print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
