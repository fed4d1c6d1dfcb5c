"""Side by side, at the shapes of MiT-tiny in the 3D pretraining step: each fast path of `unimiss.mit` against the
plain layer it replaces, forward and forward+backward, with the largest relative difference of outputs and gradients.

- `sr`: the spatial-reduction conv (kernel = stride) as `conv_tokens` (a matrix product on patches of the tokens)
  against tokens -> map -> `nn.Conv2d/3d` -> tokens;
- `up`: the decoder's transposed conv (kernel = stride = 2) as `conv_tokens` against map -> `nn.ConvTranspose2d/3d`;
- `norm`: `ConvNormAct`'s instance norm through `F.group_norm` (one group per channel) against `nn.InstanceNorm2d/3d`.

Shapes: the 2D ones are the 64 axial slices (B=2 volumes x 2 views x 16 slices of 96x96), the 3D ones the 4 volumes
of 16x96x96. Times are CPU time of this process (steadier than wall time on a shared machine), the median of `--reps`
after 2 warm-up calls, the two implementations alternating call by call.

    python bench/bench_patchwise.py [--threads 1] [--reps 9] [--json]
"""
import argparse, json, math, statistics, time

import torch
import torch.nn as nn
import torch.nn.functional as F

from unimiss.mit import conv_tokens, map_to_tokens, tokens_to_map

B2, B3 = 64, 4
CASES = [('sr', B2, (24, 24), 48, 48, 6), ('sr', B2, (12, 12), 128, 128, 4), ('sr', B2, (6, 6), 256, 256, 2),
         ('sr', B3, (8, 24, 24), 48, 48, 6), ('sr', B3, (4, 12, 12), 128, 128, 4), ('sr', B3, (2, 6, 6), 256, 256, 2),
         ('up', B2, (3, 3), 512, 256, 2), ('up', B2, (6, 6), 256, 128, 2), ('up', B2, (12, 12), 128, 48, 2),
         ('up', B3, (1, 3, 3), 512, 256, 2), ('up', B3, (2, 6, 6), 256, 128, 2), ('up', B3, (4, 12, 12), 128, 48, 2),
         ('norm', B2, (48, 48), 32, 32, 0), ('norm', B2, (24, 24), 48, 48, 0), ('norm', B2, (12, 12), 128, 128, 0),
         ('norm', B2, (6, 6), 256, 256, 0), ('norm', B2, (3, 3), 512, 512, 0),
         ('norm', B3, (16, 48, 48), 32, 32, 0), ('norm', B3, (8, 24, 24), 48, 48, 0),
         ('norm', B3, (4, 12, 12), 128, 128, 0), ('norm', B3, (2, 6, 6), 256, 256, 0), ('norm', B3, (1, 3, 3), 512, 512, 0)]


def case(kind, B, grid, c_in, c_out, k):
    "(plain fn, fast fn, input, parameters) of one case; both fns map the input to the same output."
    d = len(grid)
    if kind == 'norm':
        m = (nn.InstanceNorm2d if d == 2 else nn.InstanceNorm3d)(c_in, affine=True)
        nn.init.normal_(m.weight); nn.init.normal_(m.bias)
        x = torch.randn(B, c_in, *grid, requires_grad=True)
        return m, (lambda x: F.group_norm(x, c_in, m.weight, m.bias, m.eps)), x, [m.weight, m.bias]
    m = {('sr', 2): nn.Conv2d, ('sr', 3): nn.Conv3d, ('up', 2): nn.ConvTranspose2d, ('up', 3): nn.ConvTranspose3d}[kind, d](c_in, c_out, k, k)
    x = torch.randn(B, math.prod(grid), c_in, requires_grad=True)
    return (lambda x: map_to_tokens(m(tokens_to_map(x, grid)))), (lambda x: conv_tokens(m, x, grid)[0]), x, [m.weight, m.bias]


def rel_diff(a, b): return ((a - b).abs().max() / a.abs().max()).item()


def timed(fns, reps):
    "Median CPU seconds of each fn, calling them alternately (2 warm-up rounds)."
    ts = [[] for _ in fns]
    for i in range(reps + 2):
        for f, t in zip(fns, ts):
            c = time.process_time(); f()
            if i >= 2: t.append(time.process_time() - c)
    return [statistics.median(t) for t in ts]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--reps', type=int, default=9)
    p.add_argument('--json', action='store_true', help='one JSON line per case')
    a = p.parse_args()
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    rows = []
    for kind, B, grid, c_in, c_out, k in CASES:
        plain, fast, x, params = case(kind, B, grid, c_in, c_out, k)
        y0, y1 = plain(x), fast(x)
        g = torch.randn_like(y0)
        diff = max([rel_diff(y0, y1)] + [rel_diff(u, v) for u, v in zip(torch.autograd.grad(y0, [x, *params], g),
                                                                       torch.autograd.grad(y1, [x, *params], g))])
        fb = timed([lambda: plain(x).backward(g), lambda: fast(x).backward(g)], a.reps)
        with torch.no_grad(): fw = timed([lambda: plain(x), lambda: fast(x)], a.reps)
        r = dict(kind=kind, dims=len(grid), batch=B, grid=grid, c_in=c_in, c_out=c_out, kernel=k, threads=a.threads,
                 fwd_bwd_ms=dict(plain=round(fb[0] * 1e3, 2), fast=round(fb[1] * 1e3, 2)),
                 fwd_ms=dict(plain=round(fw[0] * 1e3, 2), fast=round(fw[1] * 1e3, 2)),
                 fwd_bwd_speedup=round(fb[0] / fb[1], 2), fwd_speedup=round(fw[0] / fw[1], 2), max_rel_diff=diff)
        rows.append(r)
        if a.json: print(json.dumps(r), flush=True)
        else:
            print(f"{kind:5}{len(grid)}D B={B:<3}grid={str(grid):13}{c_in:>4}->{c_out:<4}k={k}  fwd+bwd {fb[0]*1e3:6.1f} -> "
                  f"{fb[1]*1e3:6.1f} ms ({fb[0]/fb[1]:4.2f}x)   fwd {fw[0]*1e3:5.1f} -> {fw[1]*1e3:5.1f} ms "
                  f"({fw[0]/fw[1]:4.2f}x)   max rel diff {diff:.1e}", flush=True)
    tot = {k: sum(r[k][v] for r in rows) for k in ('fwd_bwd_ms', 'fwd_ms') for v in ('plain',)}
    fast = {k: sum(r[k]['fast'] for r in rows) for k in ('fwd_bwd_ms', 'fwd_ms')}
    summary = dict(summary=True, fwd_bwd_ms=dict(plain=round(tot['fwd_bwd_ms'], 1), fast=round(fast['fwd_bwd_ms'], 1)),
                   fwd_ms=dict(plain=round(tot['fwd_ms'], 1), fast=round(fast['fwd_ms'], 1)))
    print(json.dumps(summary) if a.json else f"all cases: fwd+bwd {summary['fwd_bwd_ms']} ms, fwd {summary['fwd_ms']} ms")


if __name__ == '__main__':
    main()
