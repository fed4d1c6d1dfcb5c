"""The CPU protocol's `unimiss` arm with X-ray and CT steps interleaved within every epoch, instead of whole epochs of
one modality in turn (issue 10: does the collapse at the switch between modalities go away when neither modality is
left untrained for a whole epoch?).

Same steps, rates and schedules as `configs/pretrain_cpu.yaml`'s 6 epochs (3 × 75 X-ray and 3 × 23 CT steps), as 3
mixed epochs of 98 steps with the CT steps spread evenly among the X-ray ones; each modality keeps its own learning
rate schedule (`lr`, `lr_3d`) over the run's iterations. Every step is logged (`OUT/log.jsonl`, the records of
`unimiss.pretrain`), the teacher is k-NN-probed on the 2D probe after each epoch (`type: probe`) and saved
(`OUT/teacherE.pth`). Not resumable: a diagnosis, not a training recipe.

    python bench/diag_interleave.py SEED OUT_DIR [KEY=JSON ...]   # config overrides, e.g. lr=0.0005
    python bench/diag_interleave.py --summary OUT_DIR             # per epoch and modality: teacher entropy, k-NN
"""
import json, sys, time
from pathlib import Path
import torch

CONFIG = Path(__file__).resolve().parents[1]/'configs'/'pretrain_cpu.yaml'


def step_order(n2:int, n3:int) -> list[int]:
    "Dimensionality of each step of a mixed epoch: `n3` CT steps spread evenly among `n2` X-ray steps."
    n = n2 + n3
    return [3 if (i * n3) // n != ((i + 1) * n3) // n else 2 for i in range(n)]


def run(seed:int, out:Path, sets:dict):
    from unimiss.evaluate import arm_config, cpu_corpus, online_probe_keys
    from unimiss import pretrain as P
    from unimiss.ssl import cosine_schedule
    out.mkdir(parents=True, exist_ok=True)
    paths = cpu_corpus()
    cfg = arm_config('unimiss', CONFIG, data_dir=str(paths['data_dir']), list_2d=str(paths['list_2d']),
                     list_3d=str(paths['list_3d']), cache_dir=str(Path(paths['list_3d']).parent/'cache'), seed=seed,
                     output_dir=str(out), progress=False, **online_probe_keys('unimiss', paths), **sets)
    P.seed_everything(cfg.seed)
    ds = P.build_datasets(cfg)
    batch = {2: cfg.batch_size_2d, 3: cfg.batch_size_3d}
    loaders = {d: P.make_loader(ds[d], batch[d], 0, cfg.seed, 0, 1, f"{d}D data") for d in (2, 3)}
    n = {d: len(loaders[d]) for d in (2, 3)}
    order, epochs = step_order(n[2], n[3]), cfg.epochs // 2
    iters = [len(order)] * epochs
    base = {2: cfg.lr, 3: cfg.lr_3d or cfg.lr}
    lr = {d: cosine_schedule(base[d] * batch[d] / 256, cfg.min_lr, iters, cfg.warmup_epochs) for d in (2, 3)}
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, iters)
    mom = cosine_schedule(cfg.momentum_teacher, 1., iters)
    sd = P.SelfDistillation(P.build_backbone(cfg), cfg, 'cpu')
    probe, it = P._online_probe(cfg), 0
    with open(out/'log.jsonl', 'w') as log:
        log.write(json.dumps(dict(type='config', seed=seed, set=sets, order=order, command=' '.join(sys.argv))) + '\n')
        for e in range(epochs):
            # each modality's batches seeded as its own epoch of the block plan would be
            batches = {d: iter(P.epoch_batches(loaders[d], n[d], cfg.seed, 0, 2 * e + (d == 3), cfg.epochs)) for d in (2, 3)}
            sd.student.train()
            for d in order:
                st = sd.step(next(batches[d]), lr=float(lr[d][it]), weight_decay=float(wd[it]), momentum=float(mom[it]),
                             teacher_temp=cfg.teacher_temp, train_last_layer=e >= cfg.freeze_last_layer)
                log.write(json.dumps(dict(type='iter', epoch=e, iteration=it, dim=d, **st, time=time.time())) + '\n')
                it += 1
            r = probe(sd.teacher.backbone)
            log.write(json.dumps(dict(type='probe', epoch=e, iteration=it, **r)) + '\n'); log.flush()
            torch.save(sd.teacher.state_dict(), out/f'teacher{e}.pth')
            print(e, r, flush=True)


def summary(d):
    from unimiss.pretrain import read_log
    recs = read_log(d)
    probes = {r['epoch']: round(r['knn_acc'], 3) for r in recs if r.get('type') == 'probe'}
    for e in sorted({r['epoch'] for r in recs if r.get('type') == 'iter'}):
        row = dict(run=Path(d).name, epoch=e)
        for dim in (2, 3):
            it = [r for r in recs if r.get('type') == 'iter' and r['epoch'] == e and r['dim'] == dim]
            row[f'{dim}d'] = dict(steps=len(it), entropy_first=round(it[0]['teacher_entropy'], 2),
                                  entropy_last=round(it[-1]['teacher_entropy'], 2),
                                  grad_norm_last=round(it[-1]['grad_norm'], 3))
        if e in probes: row['online_knn'] = probes[e]
        print(json.dumps(row))


if __name__ == '__main__':
    a = sys.argv[1:]
    if len(a) == 2 and a[0] == '--summary': summary(a[1])
    elif len(a) >= 2 and a[0].isdigit():
        run(int(a[0]), Path(a[1]), {k: json.loads(v) for k, v in (kv.split('=', 1) for kv in a[2:])})
    else: sys.exit(__doc__)
