"""Forward and forward+backward time and peak RSS of MiT-tiny/small on 2D (2,3,224,224) and 3D (2,1,16,96,96) inputs.

Each (model, input, implementation) runs in its own subprocess so that peak RSS (ru_maxrss) belongs to it alone.
Times: `--reps` repetitions after `--warmup`; the slowest quarter is dropped as interference and the median of the
rest is taken. This is done in `--rounds` separate processes per configuration, alternating which implementation
goes first, and the median over the rounds is reported (a burst of load on a shared machine spoils one process, not
the result). With `--official DIR` (a checkout's `UniMiSS/` folder of YtongXie/UniMiSS-code) the official model
is measured in the same run, interleaved with ours, and the speed-up is reported as a ratio.

With `--bound` it also counts the FLOPs of one forward+backward (convolutions and matrix products; attention is not
counted, so the bound is conservative) and divides them by the best matrix-product rate this machine reaches at
`--threads` (square and MiT-shaped sgemm, measured in the run): no implementation of the same arithmetic can be
faster than that. The table then shows how much faster than the official model any implementation could be.

    python bench/bench_mit.py [--threads 2] [--reps 15] [--official /path/to/UniMiSS] [--compile] [--bound] [--json]
                              [--configs small:2 tiny:3]
"""
import argparse, json, os, resource, statistics, subprocess, sys, time

CONFIGS = [(a, d) for a in ('tiny', 'small') for d in (2, 3)]
SHAPES = {2: (2, 3, 224, 224), 3: (2, 1, 16, 96, 96)}


def robust_median(ts):
    "Median after dropping the slowest quarter (scheduler/other-process interference only ever adds time)."
    ts = sorted(ts)
    return statistics.median(ts[:max(1, len(ts) - len(ts) // 4)])


def build(impl, arch, official_dir):
    import torch
    if impl == 'official':
        sys.path.insert(0, official_dir)
        import contextlib, io
        from models import MiT as off
        with contextlib.redirect_stdout(io.StringIO()):   # the official factories print parameter counts
            return getattr(off, f'model_{arch}')(norm2D='IN2', norm3D='IN3', act='LeakyReLU', ws=False,
                                                  img_size2D=224, img_size3D=[16, 96, 96], modal_type='MM')
    from unimiss.mit import mit_tiny, mit_small
    m = {'tiny': mit_tiny, 'small': mit_small}[arch]()
    return torch.compile(m) if impl == 'compiled' else m


def worker(impl, arch, d, threads, warmup, reps, official_dir):
    "Time one configuration in this process; print one JSON line."
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(impl, arch, official_dir)
    x = torch.randn(*SHAPES[d])
    res = dict(impl=impl, arch=arch, dims=d)
    model.eval()
    with torch.no_grad():
        for _ in range(warmup): model(x)
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); model(x); ts.append(time.perf_counter() - t)
    res['fwd_s'] = robust_median(ts)
    model.train()
    for _ in range(warmup): model(x).sum().backward()
    ts = []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter(); model(x).sum().backward(); ts.append(time.perf_counter() - t)
    res['fwd_bwd_s'] = robust_median(ts)
    res['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def gemm_peak(threads, reps=10):
    "Best float32 matrix-product rate (GFLOP/s) over a square and some MiT-shaped products, at `threads` threads."
    import torch
    torch.set_num_threads(threads)
    best = 0.
    for m, k, n in [(2048, 2048, 2048), (6272, 48, 192), (1568, 128, 512), (392, 256, 1024), (9216, 48, 192)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3): a @ b
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
        best = max(best, 2 * m * k * n / min(ts) / 1e9)
    return best


def count_flops(impl, arch, d, official_dir):
    "FLOPs of `model(x).sum().backward()` counted by torch's FlopCounterMode (SDPA on the CPU is not counted)."
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    model, x = build(impl, arch, official_dir).train(), torch.randn(*SHAPES[d])
    with FlopCounterMode(display=False) as fc: model(x).sum().backward()
    return fc.get_total_flops()


def combine(rounds):
    "One result from the per-process results of a configuration: medians over the rounds (each kept in `*_rounds`)."
    r = dict(rounds[0])
    for k in ('fwd_s', 'fwd_bwd_s', 'peak_rss_mb'):
        r[f'{k}_rounds'] = [x[k] for x in rounds]
        r[k] = statistics.median(r[f'{k}_rounds'])
    return r


def run(impl, arch, d, args):
    cmd = [sys.executable, __file__, '--worker', impl, arch, str(d), '--threads', str(args.threads),
           '--warmup', str(args.warmup), '--reps', str(args.reps)] + (['--official', args.official] if args.official else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--reps', type=int, default=15)
    p.add_argument('--rounds', type=int, default=3,
                   help="separate processes per configuration and implementation; medians over them are reported")
    p.add_argument('--official', help="path to the official UniMiSS/ folder (contains models/MiT.py)")
    p.add_argument('--compile', action='store_true', help="also measure torch.compile(model)")
    p.add_argument('--bound', action='store_true', help="also report the FLOP lower bound (see above)")
    p.add_argument('--json', action='store_true', help="print one JSON line per result instead of a table")
    p.add_argument('--configs', nargs='+', metavar='ARCH:DIMS', default=[f'{a}:{d}' for a, d in CONFIGS],
                   help="configurations to measure, e.g. small:2 tiny:3 (default: all four)")
    p.add_argument('--worker', nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, arch, d = args.worker
        return worker(impl, arch, int(d), args.threads, args.warmup, args.reps, args.official)
    if args.official and not os.path.isfile(os.path.join(args.official, 'models', 'MiT.py')):
        p.error(f"--official {args.official}: models/MiT.py not found there")
    impls = ['unimiss'] + (['compiled'] if args.compile else []) + (['official'] if args.official else [])
    configs = []
    for c in args.configs:
        arch, _, d = c.partition(':')
        if (arch, int(d) if d.isdigit() else d) not in CONFIGS:
            p.error(f"--configs {c}: expected ARCH:DIMS with ARCH tiny or small and DIMS 2 or 3")
        configs.append((arch, int(d)))
    results = []
    for arch, d in configs:
        rounds = {impl: [] for impl in impls}
        for k in range(args.rounds):   # alternate the order so that neither side always runs first
            for impl in (impls if k % 2 == 0 else impls[::-1]): rounds[impl].append(run(impl, arch, d, args))
        for impl in impls: results.append(combine(rounds[impl]))
    if args.bound:
        peak = gemm_peak(args.threads)
        for r in results:
            if r['impl'] == 'compiled': continue
            r['gflop_fwd_bwd'] = count_flops(r['impl'], r['arch'], r['dims'], args.official) / 1e9
            r['gemm_peak_gflops'] = peak
            r['bound_s'] = r['gflop_fwd_bwd'] / peak
    if args.json:
        for r in results: print(json.dumps(r))
        return
    print(f"threads={args.threads} reps={args.reps} (median of the fastest 3/4), batch 2, median of {args.rounds} "
          f"processes each (order alternating)")
    print(f"{'model':8}{'input':6}{'impl':10}{'fwd s':>9}{'fwd+bwd s':>11}{'peak RSS MB':>13}{'fwd×':>7}{'fwd+bwd×':>10}")
    base = {(r['arch'], r['dims']): r for r in results if r['impl'] == 'official'}
    for r in results:
        b = base.get((r['arch'], r['dims']))
        sp = f"{b['fwd_s'] / r['fwd_s']:7.2f}{b['fwd_bwd_s'] / r['fwd_bwd_s']:10.2f}" if b else ''
        print(f"{r['arch']:8}{str(r['dims']) + 'D':6}{r['impl']:10}{r['fwd_s']:9.3f}{r['fwd_bwd_s']:11.3f}"
              f"{r['peak_rss_mb']:13.0f}{sp}")
    if args.bound:
        print(f"\nFLOP bound: best sgemm rate here {peak:.0f} GFLOP/s at {args.threads} threads; counted FLOPs exclude attention")
        print(f"{'model':8}{'input':6}{'impl':10}{'GFLOP':>8}{'bound s':>9}{'measured s':>12}{'official s / bound s':>22}")
        for r in results:
            if 'bound_s' not in r: continue
            b = base.get((r['arch'], r['dims']))
            ceiling = f"{b['fwd_bwd_s'] / r['bound_s']:22.2f}" if b else ''
            print(f"{r['arch']:8}{str(r['dims']) + 'D':6}{r['impl']:10}{r['gflop_fwd_bwd']:8.2f}{r['bound_s']:9.3f}"
                  f"{r['fwd_bwd_s']:12.3f}{ceiling}")


if __name__ == '__main__':
    main()
