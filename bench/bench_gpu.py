"""The 3D pretraining step on one GPU, side by side in one run: the official step structure and ours in fp32, ours in
bf16, with `torch.compile` and with CUDA graphs; steps/s, peak memory, achieved TFLOP/s against the device's peak, and
the data-loader workers needed to keep up. One JSON line per variant, then a summary line.

    python bench/bench_gpu.py                                   # batch 24, MiT-tiny, all variants (a few GPU minutes)
    python bench/bench_gpu.py --variants official_fp32 ours_fp32 ours_bf16 --steps 10
    python bench/bench_gpu.py --device cpu --steps 2 --batch 2 --arch micro --out-dim 1024   # smoke test

Variants: `official_fp32` (the authors' step structure, `bench_pretrain.OfficialStyle`, same backbone), `ours_fp32`,
`ours_bf16` (autocast), `ours_compile_bf16` (`torch.compile` of the backbones), `ours_cudagraph_bf16`
(`torch.compile(mode='reduce-overhead')`, which replays the backbone's kernels as CUDA graphs). Compiled variants
need CUDA and are skipped on the CPU. A variant that fails is reported with its error and the others go on.

FLOPs are counted once per step structure with `FlopCounterMode` on an eager fp32 step (the same work is done in bf16
or compiled); achieved TFLOP/s = FLOPs / median step time. The peak is looked up from the device name (dense tensor-core
figures of the vendor's data sheet) or given with `--peak-tflops`. Workers needed = samples/s the step consumes /
samples/s one loader process gives (`Dataset3D` on phantom `.nii.gz` files, measured here in the main process).
"""
import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from bench_pretrain import OfficialStyle, setup  # noqa: E402

# dense TFLOP/s (fp32 without tensor cores, bf16 tensor cores), vendor data sheets
PEAKS = {'H200': (67., 989.), 'H100': (67., 989.), 'A100': (19.5, 312.), 'L40S': (91.6, 362.), 'A10': (31.2, 125.),
         'L4': (30.3, 121.), 'RTX 4090': (82.6, 165.), 'V100': (15.7, None)}
VARIANTS = dict(official_fp32=('official', '32', None), ours_fp32=('ours', '32', None), ours_bf16=('ours', 'bf16', None),
                ours_compile_bf16=('ours', 'bf16', 'default'), ours_cudagraph_bf16=('ours', 'bf16', 'reduce-overhead'))
HP = dict(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04)


def sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()


def build(a, precision, compile_mode):
    "The `SelfDistillation` of `bench_pretrain.setup` for one variant (backbones compiled with `compile_mode`)."
    ns = argparse.Namespace(arch=a.arch, out_dim=a.out_dim, precision=precision, device=a.device, compile=False,
                            grad_checkpointing=a.grad_checkpointing)
    torch.manual_seed(0)
    sd, views = setup(ns, a.batch)
    if compile_mode:
        for net in (sd.student, sd.teacher): net.backbone = torch.compile(net.backbone, mode=compile_mode)
    return sd, views


def step_fn(kind, sd):
    if kind == 'official':
        runner, scratch = OfficialStyle(sd), {k: [] for k in ('teacher_fwd', 'student_fwd', 'backward', 'adamw',
                                                              'ema_center')}
        return lambda views: runner.step(views, HP, scratch)
    return lambda views: sd.step(views, **HP)


def count_flops(a, kind):
    "FLOPs of one eager fp32 step of this structure."
    sd, views = build(a, '32', None)
    step = step_fn(kind, sd)
    step(views)  # the first step allocates the optimizer state
    with FlopCounterMode(display=False) as fc: step(views)
    return fc.get_total_flops()


def time_variant(a, name):
    kind, precision, compile_mode = VARIANTS[name]
    sd, views = build(a, precision, compile_mode)
    step = step_fn(kind, sd)
    for _ in range(a.warmup): step(views)
    sync(a.device)
    if a.device.startswith('cuda'): torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(a.steps):
        t = time.perf_counter(); step(views); sync(a.device); ts.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith('cuda') else None
    return statistics.median(ts), peak


def loader_rate(n_items):
    "Samples/s of one `Dataset3D` process on phantom CT files (one torch thread, as in a loader worker)."
    from unimiss.data import Dataset3D, make_phantom_corpus
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = make_phantom_corpus(tmp, n_ct=min(n_items, 8), n_xray=1, ct_shape=(256, 256, 24), xray_size=64)
            ds = Dataset3D(corpus['ct_list'], seed=0)
            ds[0]
            t = time.perf_counter()
            for i in range(n_items): ds[i % len(ds)]
            return n_items / (time.perf_counter() - t)
    finally: torch.set_num_threads(threads)


def device_peak(a):
    if a.peak_tflops: return a.peak_tflops
    if not a.device.startswith('cuda'): return None
    name = torch.cuda.get_device_name()
    for k, (fp32, bf16) in PEAKS.items():
        if k in name: return dict(fp32=fp32, bf16=bf16)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'micro'])
    p.add_argument('--batch', type=int, default=24, help="CT sub-volumes per step (the paper's per-GPU batch: 24)")
    p.add_argument('--out-dim', type=int, default=65536)
    p.add_argument('--steps', type=int, default=10, help='timed steps per variant')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per variant (compiled variants compile here)')
    p.add_argument('--grad-checkpointing', action='store_true', help='activation checkpointing in our variants')
    p.add_argument('--loader-items', type=int, default=16, help='CT samples timed for the loader rate (0: skip)')
    p.add_argument('--peak-tflops', type=float, default=None, help='device peak TFLOP/s (default: from the name)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave as is)')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA device is available here (use --device cpu for a smoke test)")
    peak = device_peak(a)
    rate = loader_rate(a.loader_items) if a.loader_items else None
    flops, rows = {}, {}
    for name in a.variants:
        kind, precision, compile_mode = VARIANTS[name]
        row = dict(bench='gpu_pretrain_3d_step', variant=name, arch=a.arch, batch=a.batch, out_dim=a.out_dim,
                   device=torch.cuda.get_device_name() if a.device.startswith('cuda') else a.device,
                   grad_checkpointing=a.grad_checkpointing and kind == 'ours', torch=torch.__version__)
        if compile_mode and not a.device.startswith('cuda'):
            row['skipped'] = 'compiled variants are measured on CUDA only'
        else:
            try:
                if kind not in flops: flops[kind] = count_flops(a, kind)
                s, mem = time_variant(a, name)
                tflops = flops[kind] / s / 1e12
                pk = peak.get('bf16' if precision == 'bf16' else 'fp32') if isinstance(peak, dict) else peak
                row.update(s_per_step=round(s, 4), steps_per_s=round(1 / s, 3), peak_mem_gb=mem and round(mem, 3),
                           gflop_per_step=round(flops[kind] / 1e9, 1), tflops=round(tflops, 3),
                           peak_tflops=pk, fraction_of_peak=round(tflops / pk, 4) if pk else None,
                           samples_per_s=round(a.batch / s, 1),
                           loader_workers_needed=math.ceil(a.batch / s / rate) if rate else None)
            except Exception as e:  # report and go on with the other variants
                row['error'] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            finally:
                if a.device.startswith('cuda'): torch.cuda.empty_cache()
        rows[name] = row
        print(json.dumps(row), flush=True)
    ref = rows.get('official_fp32', {}).get('s_per_step')
    summary = dict(bench='gpu_pretrain_3d_summary', loader_samples_per_s_per_worker=rate and round(rate, 2),
                   speedup_vs_official_fp32={n: round(ref / r['s_per_step'], 3) for n, r in rows.items()
                                             if ref and r.get('s_per_step')})
    print(json.dumps(summary), flush=True)
    return rows, summary


if __name__ == '__main__':
    main()
