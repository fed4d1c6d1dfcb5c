"""Our 3D pretraining step eager against `compile=True` (`unimiss.mit.compile_blocks`) in one process, on the CPU.

Three `SelfDistillation`s from one seed (MiT-tiny, 2 CT sub-volumes 16x96x96 in 2 views + their 64 slices,
K = 65,536): eager, the blocks of both networks compiled, the teacher's blocks only. Their steps alternate (order
reversed every other step) on the same views, so a busy machine slows all alike; the process's CPU time per step,
medians and ratios to eager, every step's loss (compiled and eager agree to float32 rounding) and the 1-minute load.
The first 2 steps (compiling, cold or from inductor's on-disk cache) are not timed.

    python bench/bench_compile.py --steps 9          # one JSON line
"""
import argparse
import json
import os
import statistics
import time

import torch

from unimiss.mit import compile_blocks
from unimiss.pretrain import SelfDistillation, build_backbone, load_config

VARIANTS = {'eager': (), 'both': ('student', 'teacher'), 'teacher': ('teacher',)}


def make(variant, a):
    torch.manual_seed(0)
    cfg = load_config(arch=a.arch, out_dim=a.out_dim, batch_size_3d=a.batch, img_size_3d=(16, 96, 96), synthetic=1,
                      num_workers=0, progress=False)
    sd = SelfDistillation(build_backbone(cfg), cfg, 'cpu')
    for net in VARIANTS[variant]: compile_blocks(getattr(sd, net))
    return sd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'micro'])
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--out-dim', type=int, default=65536)
    p.add_argument('--steps', type=int, default=9, help='timed steps per variant (after 2 untimed ones)')
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = list(VARIANTS)
    sds = {k: make(k, a) for k in names}
    torch.manual_seed(0)
    views = [torch.rand(a.batch, 1, 16, 96, 96) for _ in range(2)]
    hp = dict(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04)
    cpu, loss, load = {k: [] for k in names}, {k: [] for k in names}, []
    for i in range(2 + a.steps):
        for k in (names if i % 2 == 0 else names[::-1]):
            torch.manual_seed(i)  # the same stochastic-depth draws in every variant
            c = time.process_time()
            loss[k].append(sds[k].step(views, **hp)['loss'])
            if i >= 2: cpu[k].append(round(time.process_time() - c, 3))
        if i >= 2: load.append(round(os.getloadavg()[0], 2))
    med = {k: statistics.median(v) for k, v in cpu.items()}
    res = dict(bench='pretrain_3d_step_compile', arch=a.arch, batch=a.batch, out_dim=a.out_dim, threads=a.threads,
               steps=a.steps, cpu_s_per_step=med, speedup_vs_eager={k: round(med['eager'] / v, 3) for k, v in med.items()},
               max_rel_loss_diff={k: max(abs(x - y) / abs(y) for x, y in zip(loss[k], loss['eager'])) for k in names},
               cpu_s_per_step_all=cpu, loss=loss, loadavg_1min=load, torch=torch.__version__)
    print(json.dumps(res))
    return res


if __name__ == '__main__':
    main()
