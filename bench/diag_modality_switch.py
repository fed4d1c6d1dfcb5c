"""What a switch between X-ray and CT epochs does to a CPU-protocol run (issue 10: why the joint runs' teachers end
uniform), and whether four candidate remedies prevent it.

Runs the first `--epochs` epochs of one arm of `configs/pretrain_cpu.yaml` (X-ray, CT, X-ray, ... at the config's CT
rate), logging every step, with the student's relative update of the shared (not dimension-specific) backbone weights
added to each record (`rel_update_shared`: ||θ_after − θ_before|| / ||θ_before||). Variants (any combination, joined
by '+'):

- `single`: the run as `unimiss.pretrain` does it (one AdamW for both modalities);
- `per_dim`: a separate AdamW (its own moments) for CT steps, so Adam's second moments of the shared weights are not
  the X-ray ones when the CT epoch starts;
- `cinit`: a teacher centre that was never updated starts at the teacher's mean of its first batch (not at zero);
- `recenter`: with `cinit`, every centre restarts there at the first step of each block of epochs of one modality
  (a centre left stale by the other modality's epochs);
- `warm`: CT steps warm their learning rate up on their own, linearly over the first CT epoch;
- `rewarm`: after every switch of modality (and at the start) the learning rate warms up again, linearly over the
  first 20 steps of the block;
- `head_per_dim`: CT steps (volumes and their slices) use a DINO head of their own (a copy of the initial head, in the
  student and the teacher), X-ray steps the original one; the backbone stays shared. Implies `per_dim`.
- `freeze_new`: in the first block of epochs of a modality that starts after the other one has trained, the shared
  backbone weights are frozen: only that modality's patch embedding (and the head) learn, so that the new embedding
  fits the shared blocks before they move (as linear-probing before fine-tuning does); later blocks train everything.

    python bench/diag_modality_switch.py VARIANT SEED OUT_DIR [--epochs 3] [--arm unimiss] [--set KEY=VALUE ...]
    python bench/diag_modality_switch.py --summary OUT_DIR [OUT_DIR ...]   # per-epoch table of finished runs

then `python bench/diag_teacher_ckpts.py OUT_DIR` for how alike the teacher's features of different inputs are per
epoch. Data: the sample cache (`$UNIMISS_DATA` or the user cache dir; `cpu_corpus` builds it).
"""
import argparse, copy, json, os, sys
from pathlib import Path
import torch

VARIANTS = ('single', 'per_dim', 'cinit', 'recenter', 'warm', 'rewarm', 'head_per_dim', 'freeze_new')


def instrument(variant:str):
    "Wrap `SelfDistillation.step` for the variant's remedies and the update-size record."
    import unimiss.pretrain as P
    from unimiss.ssl import param_groups
    parts = set(variant.split('+'))
    if parts - set(VARIANTS): raise SystemExit(f"unknown variant part(s) {sorted(parts - set(VARIANTS))}; known: {VARIANTS}")
    if 'recenter' in parts: parts.add('cinit')
    if 'head_per_dim' in parts: parts.add('per_dim')
    orig = P.SelfDistillation.step

    def step(self, views, **kw):
        d = views[0].ndim - 2
        if not hasattr(self, '_shared'):
            spec = {id(p) for ps in self.dim_specific.values() for p in ps}
            self._shared = [p for p in self.student.backbone.parameters() if id(p) not in spec]
            if 'head_per_dim' in parts:  # CT head: a copy of the initial head, in both networks
                self._heads = {2: (self.student.head, self.teacher.head),
                               3: (copy.deepcopy(self.student.head), copy.deepcopy(self.teacher.head))}
                self.student.head = self._heads[3][0]
            self._opts = {2: self.optimizer, 3: (torch.optim.AdamW(param_groups(self.student), lr=0., fused=True)
                                                 if 'per_dim' in parts else self.optimizer)}
        if 'head_per_dim' in parts: self.student.head, self.teacher.head = self._heads[d]
        self.optimizer = self._opts[d]
        if 'cinit' in parts:
            loss = self.loss_for(d)
            switched = 'recenter' in parts and getattr(self, '_last_d', d) != d
            if not getattr(loss, '_started', False) or switched:
                with torch.no_grad():
                    inputs, groups = self.inputs(views)
                    t = self.teacher(inputs, groups)
                loss.center.copy_(t[0].mean(0, keepdim=True)); loss._started = True
                if self.loss_slices is not None and len(t) == 2: self.loss_slices.center.copy_(t[1].mean(0, keepdim=True))
        if 'rewarm' in parts:
            self._k = 1 if getattr(self, '_last_d', None) != d else self._k + 1
            kw['lr'] = kw['lr'] * min(1., self._k / 20)
        if getattr(self, '_last_d', None) != d:  # the first step of a block of one modality
            seen = getattr(self, '_seen', set())
            self._freeze = 'freeze_new' in parts and d not in seen and bool(seen)
            self._seen = seen | {d}
        self._last_d = d
        if 'warm' in parts and d == 3:
            self._k3 = getattr(self, '_k3', 0) + 1
            kw['lr'] = kw['lr'] * min(1., self._k3 / self._ct_epoch)
        before = [p.detach().clone() for p in self._shared]
        flags = [p.requires_grad for p in self._shared]
        if self._freeze:
            for p in self._shared: p.requires_grad_(False)
        try: stats = orig(self, views, **kw)
        finally:
            for p, f in zip(self._shared, flags): p.requires_grad_(f)
        num = torch.stack([torch.linalg.vector_norm(p.detach() - b) for p, b in zip(self._shared, before)]).norm()
        den = torch.stack([torch.linalg.vector_norm(b) for b in before]).norm()
        return stats | dict(rel_update_shared=float(num / den))
    P.SelfDistillation.step = step
    return P


def run(a):
    from unimiss.evaluate import arm_config, cpu_corpus, online_probe_keys
    P = instrument(a.variant)
    paths = cpu_corpus(a.data_root)
    sets = {}
    for kv in a.set:
        k, v = kv.split('=', 1)
        sets[k] = json.loads(v)
    common = dict(data_dir=str(paths['data_dir']), list_2d=str(paths['list_2d']), list_3d=str(paths['list_3d']),
                  cache_dir=str(Path(paths['list_3d']).parent/'cache'), log_every=1, epochs_per_run=a.epochs,
                  seed=a.seed, output_dir=a.out, progress=False) | sets
    cfg = arm_config(a.arm, a.config, **common, **online_probe_keys(a.arm, paths))
    P.SelfDistillation._ct_epoch = max(1, len(Path(paths['list_3d']).read_text().split()) // cfg.batch_size_3d)
    print(json.dumps(dict(variant=a.variant, seed=a.seed, arm=a.arm, set=sets, out=a.out)), flush=True)
    P.pretrain(cfg)


def summary(dirs):
    "Per epoch: the teacher's entropy at its first and last step, mean gradient norm and update, online k-NN."
    from unimiss.pretrain import read_log  # also skips the partial last line of a run stopped while writing it
    for d in dirs:
        recs = read_log(d)
        probes = {r['epoch']: r['knn_acc'] for r in recs if r.get('type') == 'probe'}
        for e in sorted({r['epoch'] for r in recs if r.get('type') == 'iter'}):
            it = [r for r in recs if r.get('type') == 'iter' and r['epoch'] == e]
            row = dict(run=Path(d).name, epoch=e, dim=it[0]['dim'], steps=len(it),
                       entropy_first=round(it[0]['teacher_entropy'], 2), entropy_last=round(it[-1]['teacher_entropy'], 2),
                       grad_norm_first=round(it[0]['grad_norm'], 2), grad_norm_last=round(it[-1]['grad_norm'], 3),
                       rel_update_mean=float(f"{sum(r.get('rel_update_shared', 0) for r in it) / len(it):.3g}"))
            if 'teacher_entropy_slices' in it[0]:
                row |= dict(slice_entropy_first=round(it[0]['teacher_entropy_slices'], 2),
                            slice_entropy_last=round(it[-1]['teacher_entropy_slices'], 2))
            if e in probes: row['online_knn'] = round(probes[e], 3)
            print(json.dumps(row))


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('variant', nargs='?'); p.add_argument('seed', nargs='?', type=int); p.add_argument('out', nargs='?')
    p.add_argument('--summary', nargs='+', metavar='OUT_DIR')
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--arm', default='unimiss')
    p.add_argument('--config', default=str(Path(__file__).resolve().parents[1]/'configs'/'pretrain_cpu.yaml'))
    p.add_argument('--data-root', default=os.environ.get('UNIMISS_DATA'))
    p.add_argument('--set', action='append', default=[], metavar='KEY=JSON', help='config override, e.g. weight_ss=0')
    a = p.parse_args()
    if a.summary: summary(a.summary)
    elif a.variant and a.seed is not None and a.out: run(a)
    else: p.error('give VARIANT SEED OUT_DIR, or --summary OUT_DIR ...')
