"""Time one full UniMiSS 3D pretraining step on the CPU (or a GPU with `--device cuda`).

The step: MiT-tiny, 2 CT sub-volumes of 16x96x96 in two views (4 volumes) plus their 64 axial slices, a DINO head
with 65,536 prototypes, the 4 cross-dimensional loss terms, backward, per-parameter clipping, AdamW and the EMA
teacher update.

    python bench/bench_pretrain.py --json                  # unimiss step, one JSON line
    python bench/bench_pretrain.py --json --mode official  # the authors' step structure on the same backbone
    python bench/bench_pretrain.py --json --mode compare   # both, alternating step by step in one process
    python bench/bench_pretrain.py --json --mode compare --official /tmp/official/UniMiSS   # end to end: their networks
    python bench/bench_pretrain.py --json --mode compare --official DIR --official-backbone both  # and ours in their step
    python bench/bench_pretrain.py --json --mode compare --grad-checkpointing   # also ours with checkpointing
    python bench/bench_pretrain.py --json --mode compare --official DIR --compile   # ours with compiled blocks (inductor)
    python bench/bench_pretrain.py --json --device cuda --precision bf16 [--compile] [--batch 24]
    python bench/bench_pretrain.py --json --device cuda --max-batch   # largest batch that fits
    python bench/bench_pretrain.py --json --grad-checkpointing          # activation checkpointing in the student
    python bench/bench_pretrain.py --json --mode memory --archs tiny small --batches 2 8 --warmup 1 --steps 1
    python bench/bench_pretrain.py --profile 25 --threads 1    # where our step's time goes (torch.profiler table)

`--mode official` re-enacts how the authors' `main.py` runs the same step on the same backbone weights: separate
teacher and student calls for volumes and slices (the slices copied to 3 channels), the MiT's last decoder block
on every token (the official MiT has no CLS-only path), the head on all 68 rows before averaging the slices with
its `weight_norm` prototype matrix built in each call, the centre moved inside each of the 4 loss terms, the
per-parameter clipping loop with a host read per parameter, a for-loop AdamW and an EMA loop over all parameters.
With `--official DIR` (the `UniMiSS/` folder of a YtongXie/UniMiSS-code checkout: `git archive HEAD UniMiSS | tar -x`)
the official step runs the authors' own networks instead of ours: their `MiT` (`model_tiny`/`model_small`, instance
norms and LeakyReLU as their `main.py` builds it) and their DINO `Head` in their `ModuleWrapper`, imported from the
checkout and holding our initial weights (`to_official_state_dict`, official key layout), so the ratio is end to end:
their networks in their step structure against ours in ours. Before timing, one official-style forward and loss runs
on both sets of networks from the same weights (stochastic depth off) and `same_function_check` reports the two
losses and the largest logit difference: they agree to float32 rounding. Their `model_tiny`/`model_small` drop the
`drop_path_rate` they are given, so the authors' student trains without stochastic depth; ours keeps its 0.1 (each as
its code runs). `--official-backbone ours` keeps the earlier like-for-like comparison of the step structure alone
(our networks in both steps), `both` times the two in one run (`official_our_nets`).
`--mode compare` alternates ours, the official-style step and (with `--grad-checkpointing`) ours with activation
checkpointing, step by step in one process (the order reversed every other step), so that a busy machine slows all
alike; the speed-ups are ratios of medians, of wall time and of the process's CPU time (steadier on a shared machine
at `--threads 1`), and each step records the 1-minute load average. `first_step_loss` is each variant's first loss;
they differ (stochastic depth draws, where the official loss moves its centre, and `official_our_nets` shares our
networks, so it starts from weights our first step already moved): `same_function_check` is the like-for-like one.

Memory. `peak_rss_gb` is the process's peak resident set (libraries, model, optimiser state and the step).
`step_peak_gb` is the step's own peak: the RSS after setup and `--warmup` steps (optimiser state allocated, freed
heap trimmed) is taken as the baseline, the kernel's peak-RSS mark is reset to it (Linux `clear_refs`), and the
peak during the timed steps minus the baseline is reported. `--mode memory` runs, for each arch and batch, the
official-style step, ours and ours with checkpointing, one fresh process each, with glibc told to map every block
above 64 KiB on its own (so that freed tensors leave the resident set); from the two batches it derives the step's
bytes per sample and the largest batch per GPU memory size: (GPU memory - fixed) / bytes per sample, fixed being
the training state (teacher, student, gradients, two AdamW moments) plus the step's per-batch-independent part.
These are extrapolated from CPU memory (the CUDA context and allocator slack are not counted): measure on the GPU
with `--max-batch`. Time with `--mode compare`, not with these single steps.
"""
import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from unimiss.mit import cpu_matmul, cpu_vendor
from unimiss.pretrain import SelfDistillation, build_backbone, load_config
from unimiss.ssl import DINOLoss, clip_gradients, ema_update, param_groups


def _now():
    if torch.cuda.is_available() and torch.cuda.is_initialized(): torch.cuda.synchronize()
    return time.perf_counter()


def ours_step(sd, views, hp, times):
    "The unimiss step (`SelfDistillation.step`) cut into phases, each timed (monitors and logging left out)."
    d = 3
    for g in sd.optimizer.param_groups:
        g['lr'] = hp['lr']
        if g['apply_wd']: g['weight_decay'] = hp['weight_decay']
    t = _now()
    inputs, groups = sd.inputs(views)
    with sd.autocast():
        with torch.inference_mode(): t_out = sd.teacher(inputs, groups)
        t_out = [x.clone() for x in t_out]  # as `SelfDistillation.step`
        times['teacher_fwd'].append(_now() - t); t = _now()
        s_out = sd.model(inputs, groups)
    terms = sd.loss_terms(s_out, t_out, hp['teacher_temp'], d)
    loss = sum(terms.values())
    times['student_fwd'].append(_now() - t); t = _now()
    if not torch.isfinite(loss): raise FloatingPointError('non-finite loss')
    sd.backward(loss, d)
    times['backward'].append(_now() - t); t = _now()
    if sd.scaler: sd.scaler.step(sd.optimizer); sd.scaler.update()
    else: sd.optimizer.step()
    times['adamw'].append(_now() - t); t = _now()
    ema_update(sd.teacher, sd.student, hp['momentum'])
    sd.loss.update_center(torch.cat(t_out))
    times['ema_center'].append(_now() - t)
    return float(loss.detach())


class OfficialStyle:
    """The authors' step structure (`main.py`'s `train_one_epoch3D`) around a student and a teacher network.

    `nets=None`: our backbone and head (the networks of `sd`), called as the official MiT is used (a like-for-like
    comparison of the step structure alone). `nets=(student, teacher)`: the authors' own networks (`official_nets`),
    so that the comparison is end to end."""
    def __init__(self, sd, nets=None):
        self.loss = DINOLoss(sd.cfg.out_dim)
        if nets is None: self.student, self.teacher, self.net = sd.student, sd.teacher, self.our_net
        else: (self.student, self.teacher), self.net = nets, self.official_net
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0., foreach=False, fused=False)

    @staticmethod
    def our_net(m, xs):
        # the official MiT has no CLS-only path: its last decoder block runs on every token (`forward_features`); its
        # head is a `weight_norm` linear that builds its (K, 256) weight in each call (the parametrized `last_layer`
        # does the same; ours never builds it, `CosinePrototypes`), and it runs on every row, slices included
        return m.head.last_layer(m.head.project(m.backbone.forward_features(torch.cat(xs)).cls))

    @staticmethod
    def official_net(m, xs):
        return m(list(xs))  # the official `ModuleWrapper`: one backbone call on the concatenated batches, then the head

    @staticmethod
    def clip(model, clip):
        "The official `utils.clip_gradients`: one norm, one host read and one comparison per parameter."
        norms = []
        for p in model.parameters():
            if p.grad is not None:
                n = p.grad.norm(2)
                norms.append(n.item())
                coef = clip / (n + 1e-6)
                if coef < 1: p.grad.mul_(coef)
        return norms

    def loss_and_center(self, s, t, temp):
        l = self.loss(s, t, temp)
        self.loss.update_center(t)  # the official loss moves the centre in each call
        return l

    def forward_loss(self, views, temp):
        "Teacher and student on the volumes and (3-channel copies of) their slices; the 4 loss terms, as `main.py`."
        B, D = views[0].shape[0], views[0].shape[2]
        slices = [v.reshape(-1, 1, *v.shape[-2:]).repeat_interleave(3, 1) for v in views]
        t = _now()
        t_v = self.net(self.teacher, views)  # teacher params have requires_grad=False, as officially
        t_s = self.net(self.teacher, slices).view(len(views) * B, D, -1).mean(1)
        t_fwd = _now() - t
        s_v = self.net(self.student, views)
        s_s = self.net(self.student, slices).view(len(views) * B, D, -1).mean(1)
        terms = [self.loss_and_center(s_v, t_v, temp), self.loss_and_center(s_s, t_v, temp),
                 self.loss_and_center(s_s, t_s, temp), self.loss_and_center(s_v, t_s, temp)]
        return sum(terms), terms, t_fwd

    def step(self, views, hp, times):
        ckpt = getattr(self.student.backbone, 'grad_checkpointing', False)  # the official code has no checkpointing
        if ckpt: self.student.backbone.set_grad_checkpointing(False)
        try: return self._step(views, hp, times)
        finally:
            if ckpt: self.student.backbone.set_grad_checkpointing(True)

    def _step(self, views, hp, times):
        for i, g in enumerate(self.optimizer.param_groups):
            g['lr'] = hp['lr']
            if i == 0: g['weight_decay'] = hp['weight_decay']
        t = _now()
        loss, _, t_fwd = self.forward_loss(views, hp['teacher_temp'])
        times['teacher_fwd'].append(t_fwd)
        times['student_fwd'].append(_now() - t - t_fwd); t = _now()
        if not torch.isfinite(loss): raise FloatingPointError('non-finite loss')
        self.optimizer.zero_grad()
        loss.backward()
        self.clip(self.student, 0.3)
        times['backward'].append(_now() - t); t = _now()
        self.optimizer.step()
        times['adamw'].append(_now() - t); t = _now()
        with torch.no_grad():
            m = hp['momentum']
            for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
                pt.data.mul_(m).add_((1 - m) * ps.detach().data)
        times['ema_center'].append(_now() - t)
        return float(loss.detach())


def official_nets(sd, official_dir):
    """Student and teacher built from the authors' code (the `UniMiSS/` folder of a YtongXie/UniMiSS-code checkout):
    their MiT and DINO `Head` in their `ModuleWrapper`, holding the weights of `sd`'s student (official key layout)."""
    import contextlib, io
    from unimiss.checkpoint import to_official_state_dict, unimiss_head_to_official
    if not os.path.isfile(os.path.join(official_dir, 'models', 'MiT.py')):
        raise SystemExit(f"--official {official_dir}: models/MiT.py not found there (expected the UniMiSS/ folder)")
    sys.path.insert(0, official_dir)
    from models import MiT as off
    import utils as off_utils  # the checkout's utils.py (its `ModuleWrapper`)
    cfg, bb = sd.cfg, sd.student.backbone
    state = to_official_state_dict(bb) | {f'__head__.{k}': v for k, v in
                                           unimiss_head_to_official(sd.student.head.state_dict()).items()}
    def make():
        with contextlib.redirect_stdout(io.StringIO()):  # the official factories print parameter counts
            m = getattr(off, f'model_{cfg.arch}')(norm2D='IN2', norm3D='IN3', act='LeakyReLU', ws=False,
                                                  img_size2D=cfg.img_size_2d, img_size3D=list(cfg.img_size_3d),
                                                  modal_type='MM', drop_path_rate=cfg.drop_path_rate)
        head = off.Head(bb.embed_dim, cfg.out_dim, norm_last_layer=cfg.norm_last_layer)
        m.load_state_dict({k: v for k, v in state.items() if not k.startswith('__head__.')})
        head.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith('__head__.')})
        return off_utils.ModuleWrapper(m, head).to(sd.device)
    student, teacher = make(), make()
    for p in teacher.parameters(): p.requires_grad = False  # as `main.py`
    return student, teacher


def same_function(sd, nets, views, temp):
    """One official-style forward and loss with our networks and with the authors' (`nets`), from the same weights,
    stochastic depth off on both: the loss of each and the largest logit difference (float32 rounding expected)."""
    from unimiss.mit import DropPath
    drops = [m for m in sd.student.modules() if isinstance(m, DropPath)]
    ps = [m.p for m in drops]
    for m in drops: m.p = 0.
    try:
        with torch.no_grad():
            a, b = OfficialStyle(sd), OfficialStyle(sd, nets)
            la, ta, _ = a.forward_loss(views, temp)
            lb, tb, _ = b.forward_loss(views, temp)
            logit = max(float((a.net(n1, views) - b.net(n2, views)).abs().max())
                        for n1, n2 in ((a.student, b.student), (a.teacher, b.teacher)))
    finally:
        for m, p in zip(drops, ps): m.p = p
    return dict(loss_ours_nets=float(la), loss_official_nets=float(lb), loss_abs_diff=abs(float(la) - float(lb)),
                terms_abs_diff=max(abs(float(x) - float(y)) for x, y in zip(ta, tb)), volume_logits_max_abs_diff=logit)


def compare(sd, views, hp, a):
    """Alternate the unimiss step, the official step ('official': the authors' networks with `--official DIR`, else
    our networks; 'official_our_nets': our networks in the official step structure, with `--official-backbone both`)
    and (with `--grad-checkpointing`) the unimiss step with activation checkpointing, step by step in one process;
    medians of each and their ratios (wall and CPU time)."""
    backbone, scratch = sd.student.backbone, {k: [] for k in ('teacher_fwd', 'student_fwd', 'backward', 'adamw', 'ema_center')}
    runners, check = {}, None
    if a.official:
        nets = official_nets(sd, a.official)
        check = same_function(sd, nets, views, hp['teacher_temp'])
        runners['official'] = OfficialStyle(sd, nets)
        if a.official_backbone == 'both': runners['official_our_nets'] = OfficialStyle(sd)
    else: runners['official'] = OfficialStyle(sd)
    names = ['unimiss', *runners] + (['unimiss_ckpt'] if a.grad_checkpointing else [])
    wall, cpu, load, first_loss = {n: [] for n in names}, {n: [] for n in names}, [], {}
    for i in range(a.warmup + a.steps):
        for name in (names if i % 2 == 0 else names[::-1]):  # alternate the order: neither side always runs first
            backbone.set_grad_checkpointing(name == 'unimiss_ckpt')
            t, c = _now(), time.process_time()
            loss = sd.step(views, **hp)['loss'] if name not in runners else runners[name].step(views, hp, scratch)
            if i >= a.warmup:
                wall[name].append(_now() - t); cpu[name].append(time.process_time() - c)
            first_loss.setdefault(name, round(loss, 5))
        if i >= a.warmup: load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    res = dict(bench='pretrain_3d_step', mode='compare', arch=a.arch, variants=names,
               official_networks='authors' if a.official else 'ours', precision=a.precision, compile=a.compile,
               threads=a.threads, batch=a.batch, out_dim=a.out_dim, steps=a.steps, warmup=a.warmup,
               s_per_step={k: round(v, 3) for k, v in med.items()},
               cpu_s_per_step={k: round(v, 3) for k, v in cmed.items()},
               speedup_vs_official=round(med['official'] / med['unimiss'], 3),
               cpu_speedup_vs_official=round(cmed['official'] / cmed['unimiss'], 3))
    if 'official_our_nets' in runners:
        res.update(speedup_vs_official_our_nets=round(med['official_our_nets'] / med['unimiss'], 3),
                   cpu_speedup_vs_official_our_nets=round(cmed['official_our_nets'] / cmed['unimiss'], 3))
    if check: res['same_function_check'] = check
    res.update(first_step_loss=first_loss, s_per_step_all={k: [round(x, 3) for x in v] for k, v in wall.items()},
               cpu_s_per_step_all={k: [round(x, 3) for x in v] for k, v in cpu.items()},
               loadavg_1min=[round(x, 2) for x in load], torch=torch.__version__, cpu_matmul=cpu_matmul(), cpu_vendor=cpu_vendor())
    if a.grad_checkpointing:
        res.update(ckpt_time_vs_unimiss=round(med['unimiss_ckpt'] / med['unimiss'], 3),
                   ckpt_time_vs_official=round(med['unimiss_ckpt'] / med['official'], 3))
    print(json.dumps(res) if a.json else res)
    return res


def profile(sd, views, hp, a):
    "Top `a.profile` ops by self CPU time of one unimiss step (after `a.warmup` steps), as torch.profiler's table."
    from torch.profiler import ProfilerActivity, profile as prof
    for _ in range(max(1, a.warmup)): sd.step(views, **hp)
    with prof(activities=[ProfilerActivity.CPU]) as p: sd.step(views, **hp)
    table = p.key_averages().table(sort_by='self_cpu_time_total', row_limit=a.profile)
    print(table)
    return table


def setup(a, batch):
    "A `SelfDistillation` on `a.device` and two random views of `batch` CT sub-volumes."
    cfg = load_config(arch=a.arch, grad_checkpointing=a.grad_checkpointing, out_dim=a.out_dim, batch_size_3d=batch, img_size_3d=(16, 96, 96),
                      precision=a.precision, synthetic=1, num_workers=0, progress=False, compile=a.compile)
    sd = SelfDistillation(build_backbone(cfg), cfg, a.device)  # `compile`: the transformer blocks (`compile_blocks`)
    return sd, [torch.rand(batch, 1, 16, 96, 96, device=a.device) for _ in range(2)]


def max_batch(a, hp):
    "Largest power-of-two multiple of `a.batch` whose step fits in GPU memory (two steps each)."
    best, b = None, a.batch
    while b <= 4096:
        try:
            sd, views = setup(a, b)
            for _ in range(2): sd.step(views, **hp)
            torch.cuda.synchronize(); best = b
        except torch.OutOfMemoryError: break
        finally:
            sd = views = None; torch.cuda.empty_cache()
        b *= 2
    res = dict(bench='pretrain_3d_max_batch', precision=a.precision, compile=a.compile, out_dim=a.out_dim,
               largest_batch=best, gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    print(json.dumps(res) if a.json else res)
    return res


GPU_GB = (24, 40, 80)
_PEAK_BEFORE = 0.
# in the `--mode memory` workers: every allocation above 64 KiB is its own mapping, returned to the system when freed,
# so that the resident set follows the live tensors (glibc's default moving threshold keeps freed blocks resident)
MALLOC_ENV = dict(MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='65536')


def _status_kb(key):
    "A `VmRSS` / `VmHWM` line of /proc/self/status, in kB (None where there is no procfs)."
    try:
        for line in open('/proc/self/status'):
            if line.startswith(key + ':'): return int(line.split()[1])
    except OSError: return None


def _maxrss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_peak_start():
    "Resident set after setup and warm-up (freed heap trimmed first); resets the process's peak RSS to it."
    global _PEAK_BEFORE
    _PEAK_BEFORE = _maxrss_gb()  # the reset below also resets ru_maxrss
    try: ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError): pass
    base = _status_kb('VmRSS')
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')  # Linux: VmHWM <- VmRSS
    except OSError: return None
    return base


def step_peak_gb(base):
    "Peak RSS since `step_peak_start` above its baseline, in GB (None without the Linux peak reset)."
    hwm = _status_kb('VmHWM')
    return None if base is None or hwm is None else round((hwm - base) / 2**20, 3)


def state_gb(sd):
    "Bytes the training state holds whatever the batch: teacher and student weights, gradients, AdamW's two moments."
    n = sum(p.numel() * p.element_size() for p in sd.student.parameters())
    return round(5 * n / 2**30, 3)


def extrapolate(rows, archs, batches, variants=('official', 'unimiss', 'unimiss_ckpt')):
    "Step bytes per sample from the smallest and largest batch, and the largest batch per GPU size (extrapolated)."
    extrap = []
    for arch in archs:
        lo, hi = [r for r in rows if r['arch'] == arch and r['batch'] in (min(batches), max(batches))]
        if lo is hi: continue
        for name in variants:
            per = (hi[f'{name}_step_peak_gb'] - lo[f'{name}_step_peak_gb']) / (hi['batch'] - lo['batch'])
            fixed = lo['state_gb'] + lo[f'{name}_step_peak_gb'] - per * lo['batch']
            extrap.append(dict(arch=arch, variant=name, step_gb_per_sample=round(per, 4), fixed_gb=round(fixed, 3),
                               **{f'max_batch_{g}gb_extrapolated': int((g - fixed) // per) if per > 0 else None
                                  for g in GPU_GB}))
    return extrap


def memory(a):
    """Per (arch, batch, variant) in a fresh process (setup, `--warmup` steps, `--steps` steps): the whole process's
    peak RSS and the step's own peak (peak RSS during the timed steps minus the RSS after setup and warm-up);
    bytes per sample from the two batches and the largest batch per GPU size, extrapolated."""
    variants = {'official': ['--mode', 'official'], 'unimiss': [], 'unimiss_ckpt': ['--grad-checkpointing']}
    rows = []
    for arch in a.archs:
        for b in a.batches:
            row = dict(arch=arch, batch=b, threads=a.threads, out_dim=a.out_dim)
            for name, extra in variants.items():
                cmd = [sys.executable, __file__, '--json', '--arch', arch, '--batch', str(b), '--steps', str(a.steps),
                       '--warmup', str(a.warmup), '--phase-steps', '0', '--threads', str(a.threads),
                       '--out-dim', str(a.out_dim), *extra]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ | MALLOC_ENV)
                r = json.loads(out.stdout.splitlines()[-1])
                row.update({f'{name}_rss_gb': r['peak_rss_gb'], f'{name}_step_peak_gb': r['step_peak_gb'],
                            f'{name}_s': r['s_per_step']})  # single steps in separate processes: not a timing
                row['state_gb'] = r['state_gb']
            for name in ('unimiss', 'unimiss_ckpt'):
                for k in ('rss', 'step_peak'):
                    row[f'{name}_{k}_vs_official'] = round(row[f'{name}_{k}_gb'] / row[f'official_{k}_gb'], 3)
            row['loadavg_1min'] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    extrap = extrapolate(rows, a.archs, a.batches, variants)
    for e in extrap: print(json.dumps(e), flush=True)
    return dict(rows=rows, extrapolated=extrap)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--mode', choices=['unimiss', 'official', 'compare', 'memory'], default='unimiss')
    p.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'micro'])
    p.add_argument('--grad-checkpointing', action='store_true', help='activation checkpointing in the student')
    p.add_argument('--archs', nargs='+', default=['tiny', 'small'], help='--mode memory: archs to measure')
    p.add_argument('--batches', nargs='+', type=int, default=[2, 8], help='--mode memory: batches to measure')
    p.add_argument('--precision', choices=['32', 'bf16', 'fp16'], default='32', help="'fp16' needs CUDA")
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (GPU: times include a synchronize)")
    p.add_argument('--compile', action='store_true', help="torch.compile the transformer blocks of our student and "
                   "teacher (PretrainConfig.compile; the official step stays eager; compiling runs in --warmup)")
    p.add_argument('--max-batch', action='store_true',
                   help='instead of timing: double --batch until a step runs out of GPU memory; print the largest')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--steps', type=int, default=5, help='timed steps (after --warmup untimed ones)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--phase-steps', type=int, default=2, help='extra steps timed phase by phase (unimiss mode)')
    p.add_argument('--batch', type=int, default=2, help='CT sub-volumes per step (each in 2 views)')
    p.add_argument('--out-dim', type=int, default=65536)
    p.add_argument('--json', action='store_true', help='print one JSON line')
    p.add_argument('--profile', type=int, metavar='N', default=0,
                   help="instead of timing: a torch.profiler table of the N ops with the most self CPU time in one "
                        "unimiss step (after --warmup steps)")
    p.add_argument('--official', metavar='DIR', help="the UniMiSS/ folder of an official checkout: the official step "
                   "runs the authors' MiT and head (holding our weights) instead of ours")
    p.add_argument('--official-backbone', choices=['authors', 'ours', 'both'], default=None,
                   help="networks of the official step: the authors' (default with --official), ours (default "
                        "without), or both in one run (--mode compare)")
    a = p.parse_args(argv)
    a.official_backbone = a.official_backbone or ('authors' if a.official else 'ours')
    if a.official_backbone != 'ours' and not a.official:
        p.error(f"--official-backbone {a.official_backbone} needs --official DIR (the authors' networks)")
    if a.official_backbone == 'ours': a.official = None
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    hp = dict(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04)
    if a.max_batch: return max_batch(a, hp)
    if a.mode == 'memory': return memory(a)
    sd, views = setup(a, a.batch)
    if a.profile: return profile(sd, views, hp, a)
    if a.mode == 'compare': return compare(sd, views, hp, a)
    if a.device != 'cpu': torch.cuda.reset_peak_memory_stats()
    runner = None
    if a.mode == 'official':
        runner = OfficialStyle(sd, official_nets(sd, a.official) if a.official else None)
    times = {k: [] for k in ('teacher_fwd', 'student_fwd', 'backward', 'adamw', 'ema_center')}
    totals, base = [], None
    for i in range(a.warmup + a.steps):
        if i == a.warmup and a.device == 'cpu': base = step_peak_start()
        t = _now()
        loss = runner.step(views, hp, times) if runner else sd.step(views, **hp)['loss']
        if i >= a.warmup: totals.append(_now() - t)
        else:
            for v in times.values(): v.clear()
    step_peak = step_peak_gb(base)
    if not runner:  # the same step again, cut into phases
        for _ in range(a.phase_steps): ours_step(sd, views, hp, times)
    res = dict(bench='pretrain_3d_step', mode=a.mode, arch=a.arch, grad_checkpointing=a.grad_checkpointing,
               official_networks=('authors' if a.official else 'ours') if a.mode == 'official' else None,
               precision=a.precision, threads=a.threads, batch=a.batch,
               out_dim=a.out_dim, steps=a.steps, s_per_step=round(statistics.median(totals), 3),
               s_per_step_min=round(min(totals), 3), steps_per_s=round(1 / statistics.median(totals), 3),
               peak_rss_gb=round(max(_PEAK_BEFORE, _maxrss_gb()), 3),
               step_peak_gb=step_peak, state_gb=state_gb(sd), loadavg_1min=round(os.getloadavg()[0], 2),
               phases_s={k: round(statistics.median(v), 3) for k, v in times.items() if v}, loss=round(loss, 4),
               torch=torch.__version__, cpu=platform.processor() or platform.machine(), device=a.device,
               compile=a.compile)
    if a.device != 'cpu':
        res.update(gpu=torch.cuda.get_device_name(), peak_gpu_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3))
    if a.json: print(json.dumps(res))
    else:
        for k, v in res.items(): print(f"{k:>16}: {v}")
    return res


if __name__ == '__main__':
    main()
