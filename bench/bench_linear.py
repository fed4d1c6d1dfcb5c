"""The linear layers of a MiT on the CPU: torch's `F.linear` (MKL in the PyPI wheels) against `unimiss.mit.linear`
(oneDNN for the output and the input gradient), side by side in one process.

The shapes are those of a real forward pass: every `Linear` call of the model on the given input is recorded, then
each distinct (rows, in, out) is timed forward+backward both ways in alternating rounds. Prints one line per shape
and a total weighted by how often each shape occurs, as ratios (torch time / oneDNN time) and GFLOP/s.

    python bench/bench_linear.py                          # MiT-tiny, a CT step's inputs (2 x 2 views, 64 slices)
    python bench/bench_linear.py --arch small --threads 2 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

from unimiss.mit import Linear, MIT_ARCHS, MiT, linear, onednn_matmul_available, set_cpu_matmul
from unimiss.ssl import volume_to_slices


def linear_shapes(model, inputs) -> Counter:
    "(rows, in_features, out_features) of every `Linear` call in one forward pass of `model` on each input."
    seen = Counter()
    def hook(m, args, out): seen[(args[0].numel() // args[0].shape[-1], m.in_features, m.out_features)] += 1
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Linear)]
    with torch.no_grad():
        for x in inputs: model(x)
    for h in handles: h.remove()
    return seen


def time_shape(rows, k, n, fn, reps):
    "Median CPU seconds of forward+backward of `fn(x, w, b)` on random (rows, k) inputs."
    x = torch.randn(rows, k, requires_grad=True)
    w = (torch.randn(n, k) * k ** -0.5).requires_grad_()
    b = torch.zeros(n, requires_grad=True)
    g = torch.randn(rows, n)
    def once(): torch.autograd.grad(fn(x, w, b), [x, w, b], g)
    once()
    ts = []
    for _ in range(reps):
        t = time.process_time(); once(); ts.append(time.process_time() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='tiny', choices=list(MIT_ARCHS))
    p.add_argument('--batch', type=int, default=2, help='CT sub-volumes (each in 2 views, 16 slices per view)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--reps', type=int, default=5, help='timed repetitions per shape and round')
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds (torch, oneDNN) per shape')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    a = p.parse_args(argv)
    if not onednn_matmul_available():
        print('this torch build has no oneDNN linear kernel: nothing to compare', file=sys.stderr); return 1
    set_cpu_matmul('onednn')  # whatever $UNIMISS_CPU_MATMUL says: this compares the two
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = MiT(**MIT_ARCHS[a.arch]).eval()
    vols = torch.randn(2 * a.batch, 1, 16, 96, 96)
    shapes = linear_shapes(model, [vols, volume_to_slices(vols)])
    rows, tot = [], {'torch': 0., 'onednn': 0.}
    for (m, k, n), count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[1]):
        r = {'torch': [], 'onednn': []}
        for _ in range(a.rounds):
            r['torch'].append(time_shape(m, k, n, F.linear, a.reps))
            r['onednn'].append(time_shape(m, k, n, linear, a.reps))
        t = {kk: statistics.median(v) for kk, v in r.items()}
        flop = 6 * m * k * n  # forward, input gradient, weight gradient
        for kk in tot: tot[kk] += count * t[kk]
        rows.append(dict(rows=m, in_features=k, out_features=n, calls=count, ms_torch=round(1e3 * t['torch'], 3),
                         ms_onednn=round(1e3 * t['onednn'], 3), gflops_torch=round(flop / t['torch'] / 1e9, 1),
                         gflops_onednn=round(flop / t['onednn'] / 1e9, 1), ratio=round(t['torch'] / t['onednn'], 3)))
    out = dict(bench='linear_fwd_bwd', arch=a.arch, batch=a.batch, threads=a.threads,
               torch=torch.__version__, shapes=rows, total_ms_torch=round(1e3 * tot['torch'], 1),
               total_ms_onednn=round(1e3 * tot['onednn'], 1), total_ratio=round(tot['torch'] / tot['onednn'], 3))
    if a.json: print(json.dumps(out)); return 0
    print(f"MiT-{a.arch} linears, one forward of {2 * a.batch} CT views + their slices, fwd+bwd per call, {a.threads} thread(s)")
    print(f"{'rows':>7} {'in':>5} {'out':>5} {'calls':>5} {'torch ms':>9} {'oneDNN ms':>9} {'GF/s torch':>10} {'GF/s oneDNN':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['rows']:7d} {r['in_features']:5d} {r['out_features']:5d} {r['calls']:5d} {r['ms_torch']:9.2f} "
              f"{r['ms_onednn']:9.2f} {r['gflops_torch']:10.1f} {r['gflops_onednn']:11.1f} {r['ratio']:6.2f}")
    print(f"all calls: torch {out['total_ms_torch']} ms, oneDNN {out['total_ms_onednn']} ms, ratio {out['total_ratio']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
