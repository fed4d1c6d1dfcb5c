"""MiT on a GPU: forward+backward time of tiny/small on 2D (B,3,224,224) and 3D (B,1,16,96,96) inputs in fp32,
bf16 autocast and `torch.compile` (fp32 and bf16), and peak GPU memory. One JSON line per result with `--json`.

    python bench/bench_mit_gpu.py [--archs tiny small] [--dims 2 3] [--batch 2 32] [--reps 20]
                                  [--variants fp32 bf16 compile_fp32 compile_bf16] [--no-coalesce-analysis] [--json]

Times are medians of `--reps` synchronised repetitions after `--warmup`; the loss is `out.float().square().mean()`.
A variant that fails (e.g. an Inductor error while compiling) is reported with its error and the others go on.
On torch 2.11 Inductor fails on the 3D models with an AssertionError in its memory-coalescing analysis;
`--no-coalesce-analysis` turns that analysis off (`torch._inductor.config.triton.coalesce_tiling_analysis`).
"""
import argparse, json, statistics, time

import torch

from unimiss.mit import mit_small, mit_tiny

ARCHS = dict(tiny=mit_tiny, small=mit_small)
VARIANTS = dict(fp32=(False, False), bf16=(False, True), compile_fp32=(True, False), compile_bf16=(True, True))  # compile, bf16


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
    p.add_argument('--dims', type=int, nargs='+', default=[2, 3], choices=[2, 3])
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--no-coalesce-analysis', action='store_true',
                   help="turn off Inductor's coalescing analysis (works around its AssertionError on 3D models)")
    p.add_argument('--json', action='store_true')
    a = p.parse_args(argv)
    if a.no_coalesce_analysis:
        import torch._inductor.config as inductor_config
        inductor_config.triton.coalesce_tiling_analysis = False
    if not torch.cuda.is_available(): raise SystemExit('bench_mit_gpu needs a CUDA device')
    torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    results = []
    for arch in a.archs:
        for d in a.dims:
            model = ARCHS[arch](spatial_dims=d).cuda().train()
            compiled = torch.compile(model) if any(v.startswith('compile') for v in a.variants) else None
            for b in a.batch:
                x = torch.randn(shape(d, b), device='cuda')
                base = None
                for name in a.variants:
                    compile_, bf16 = VARIANTS[name]
                    r = dict(bench='mit_gpu_fwd_bwd', arch=arch, dim=f'{d}D', batch=b, variant=name,
                             gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                             coalesce_analysis=not a.no_coalesce_analysis)
                    try: s, mem = time_variant(compiled if compile_ else model, x, bf16, a.reps, a.warmup)
                    except Exception as e:   # a compiler bug in one variant should not cost the others
                        r['error'] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                        results.append(r)
                        print(json.dumps(r) if a.json else f"{arch:>5} {d}D B={b:<3} {name:>13}: failed, {r['error']}",
                              flush=True)
                        torch._dynamo.reset(); compiled = torch.compile(model) if compiled is not None else None
                        continue
                    base = base or (s if name == 'fp32' else None)
                    r.update(s=round(s, 5), samples_per_s=round(b / s, 1), peak_gpu_mem_gb=round(mem, 3),
                             speedup_vs_fp32=round(base / s, 2) if base else None)
                    results.append(r)
                    print(json.dumps(r) if a.json else
                          f"{arch:>5} {d}D B={b:<3} {name:>13}: {s * 1e3:8.2f} ms  {b / s:8.1f}/s  "
                          f"x{r['speedup_vs_fp32'] or float('nan'):4.2f}  {mem:6.2f} GB", flush=True)
            del model, compiled; torch.cuda.empty_cache()
    return results


if __name__ == '__main__':
    main()
