"""MiT on a GPU: forward+backward time of tiny/small on 2D (B,3,224,224) and 3D (B,1,16,96,96) inputs in fp32,
bf16 autocast and `torch.compile` (fp32 and bf16), and peak GPU memory. One JSON line per result with `--json`.

    python bench/bench_mit_gpu.py [--archs tiny small] [--batch 2 32] [--reps 20] [--no-compile] [--json]

Times are medians of `--reps` synchronised repetitions after `--warmup`; the loss is `out.float().square().mean()`.
"""
import argparse, json, statistics, time

import torch

from unimiss.mit import mit_small, mit_tiny

ARCHS = dict(tiny=mit_tiny, small=mit_small)


def shape(d, b): return (b, 3, 224, 224) if d == 2 else (b, 1, 16, 96, 96)


def time_variant(model, x, bf16, reps, warmup):
    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().square().mean().backward()
    for _ in range(warmup): step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return statistics.median(ts), torch.cuda.max_memory_allocated() / 2**30


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, nargs='+', default=[2, 32])
    p.add_argument('--reps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--archs', nargs='+', default=list(ARCHS), choices=list(ARCHS))
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile variants')
    p.add_argument('--json', action='store_true')
    a = p.parse_args(argv)
    if not torch.cuda.is_available(): raise SystemExit('bench_mit_gpu needs a CUDA device')
    torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    results = []
    for arch in a.archs:
        for d in (2, 3):
            model = ARCHS[arch](spatial_dims=d).cuda().train()
            variants = [('fp32', model, False), ('bf16', model, True)]
            if not a.no_compile:
                compiled = torch.compile(model)
                variants += [('compile_fp32', compiled, False), ('compile_bf16', compiled, True)]
            for b in a.batch:
                x = torch.randn(shape(d, b), device='cuda')
                base = None
                for name, m, bf16 in variants:
                    s, mem = time_variant(m, x, bf16, a.reps, a.warmup)
                    base = base or s
                    r = dict(bench='mit_gpu_fwd_bwd', arch=arch, dim=f'{d}D', batch=b, variant=name, s=round(s, 5),
                             samples_per_s=round(b / s, 1), speedup_vs_fp32=round(base / s, 2),
                             peak_gpu_mem_gb=round(mem, 3), gpu=torch.cuda.get_device_name(), torch=torch.__version__)
                    results.append(r)
                    print(json.dumps(r) if a.json else
                          f"{arch:>5} {d}D B={b:<3} {name:>13}: {s * 1e3:8.2f} ms  {b / s:8.1f}/s  x{base / s:4.2f}  {mem:6.2f} GB",
                          flush=True)
            del model, variants; torch.cuda.empty_cache()
    return results


if __name__ == '__main__':
    main()
