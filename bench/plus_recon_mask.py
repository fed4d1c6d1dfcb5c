"""UniMiSS+ with and without masked reconstruction, on the offline sample corpus (CPU-sized).

For each seed, two runs that differ only in `recon_mask_ratio` (0: the official full-view reconstruction; R: R of
the 8-pixel patches hidden, MSE on the hidden pixels), configured by configs/pretrain_plus-sample.yaml. Reported
per run: the reconstruction losses of the last CT+DRR and X-ray epochs (each arm's own training loss), the
final student's reconstruction MSE on the same fixed inputs for both arms (the corpus' X-rays and CT sub-volumes:
full view, and hidden pixels of a fixed 50% mask), and a frozen-teacher probe (k-NN and linear, 3 split seeds) on
the CPU protocol's 2D (Br35H, cls2d) and 3D (CT organ patches, patch3d) datalists; the randomly initialised MiT+ is
probed too. A finished run folder is reused (the run resumes at its end), so a rerun only re-evaluates. The CT
sub-volumes need their DRRs first:

    python -m unimiss.drr DATA/ct --detector 320 --pitch 1.148

Run: python bench/plus_recon_mask.py --data DATA --probe-dir DIR --out runs/plus_mask --seeds 0 1 --ratio 0.5
(--epochs N: longer runs than the sample config's 6 epochs)
"""
import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import yaml

from unimiss.data import read_list_file
from unimiss.evaluate import load_probe, probe, volume_input, xray_input
from unimiss.mitplus import mit_plus_micro
from unimiss.pretrain import load_checkpoint, load_config, pretrain, read_log
from unimiss.pretrain_plus import minmax, patch_mask, recon_loss

ROOT = Path(__file__).resolve().parents[1]
KEYS = ('img_size_2d', 'img_size_3d', 'arch', 'out_dim', 'epochs', 'interval', 'batch_size_2d', 'batch_size_3d',
        'lr', 'warmup_epochs', 'seed')


def sample_config(**kw):
    y = yaml.safe_load((ROOT/'configs'/'pretrain_plus-sample.yaml').read_text())
    return load_config({k: y[k] for k in KEYS} | y['pretrain_options'] | dict(num_workers=0, progress=False) | kw)


def network_of(checkpoint, img2d, img3d, which='teacher'):
    m = mit_plus_micro(img_size2d=img2d, img_size3d=img3d)
    sd = load_checkpoint(checkpoint)[which]
    m.load_state_dict({k.removeprefix('backbone.'): v for k, v in sd.items() if k.startswith('backbone.')})
    return m.eval().requires_grad_(False)


@torch.no_grad()
def recon_errors(model, inputs, ratio=0.5, patch=8):
    "Reconstruction MSE of `model` on fixed inputs: the full view, and the hidden pixels of a fixed mask."
    out = {}
    for d, x in inputs.items():
        target = minmax(x) if d == 3 else x
        torch.manual_seed(123)
        m = patch_mask(x, ratio, patch)
        out[f'full_{d}d'] = round(recon_loss(model.reconstruct(x).image, target).item(), 5)
        out[f'hidden_{d}d'] = round(recon_loss(model.reconstruct(x.masked_fill(m, 0.)).image, target, m).item(), 5)
    return out


def probes(model, splits):
    out = {}
    for task, s in splits.items():
        r = probe(model, s)
        out[task] = {k: round(r[k], 4) for k in ('knn_acc_mean', 'knn_acc_sd', 'linear_acc_mean', 'linear_acc_sd')}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', required=True, help='data_dir with xray_list.txt, ct_list.txt and the DRRs')
    ap.add_argument('--probe-dir', required=True, help='folder with probe_br35h.json and probe_ct.json')
    ap.add_argument('--out', default='runs/plus_mask')
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    ap.add_argument('--ratio', type=float, default=0.5)
    ap.add_argument('--epochs', type=int, default=0, help='override the sample config (6 epochs)')
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    longer = dict(epochs=a.epochs) if a.epochs else {}
    base = sample_config(**longer)
    pd = Path(a.probe_dir)
    splits = {'cls2d': load_probe(pd/'probe_br35h.json', 'cls2d', base.img_size_2d, range(3), 0.3),
              'patch3d': load_probe(pd/'probe_ct.json', 'patch3d', base.img_size_3d, range(3), 0.3, 32)}
    files = {d: read_list_file(Path(a.data)/f'{n}_list.txt', root=a.data) for d, n in ((2, 'xray'), (3, 'ct'))}
    inputs = {2: torch.stack([xray_input(f, base.img_size_2d) for f in files[2]]).expand(-1, 3, -1, -1),
              3: torch.stack([volume_input(f, base.img_size_3d) for f in files[3]])}
    torch.manual_seed(0)
    rnd = mit_plus_micro(img_size2d=base.img_size_2d, img_size3d=base.img_size_3d).eval()
    results = dict(random=dict(student_recon=recon_errors(rnd, inputs), **probes(rnd, splits)))
    print(json.dumps(dict(run='random', **results['random'])), flush=True)
    for seed in a.seeds:
        for ratio in (0., a.ratio):
            name = f'mask{ratio:g}_seed{seed}'
            cfg = sample_config(**longer, seed=seed, recon_mask_ratio=ratio, data_dir=a.data, list_2d='xray_list.txt',
                                list_3d='ct_list.txt', output_dir=str(Path(a.out)/name))
            res = pretrain(cfg)
            ep = [r for r in read_log(res['log']) if r['type'] == 'epoch']
            last = {d: [r for r in ep if r['dim'] == d][-1] for d in (2, 3)}
            row = dict(run=name, seed=seed, ratio=ratio, seconds=round(sum(r['seconds'] for r in ep), 1),
                       loss_re_ct=round(last[3]['loss_re_ct'], 5), loss_re_drr=round(last[3]['loss_re_drr'], 5),
                       loss_re_2d=round(last[2]['loss_re_2d'], 5),
                       teacher_entropy_3d=round(last[3]['teacher_entropy'], 3),
                       teacher_entropy_2d=round(last[2]['teacher_entropy'], 3),
                       student_recon=recon_errors(network_of(res['checkpoint'], cfg.img_size_2d, cfg.img_size_3d,
                                                             'student'), inputs),
                       **probes(network_of(res['checkpoint'], cfg.img_size_2d, cfg.img_size_3d), splits))
            results[name] = row
            print(json.dumps(row), flush=True)
    summary = {}
    for ratio in (0., a.ratio):
        rows = [r for r in results.values() if r.get('ratio') == ratio]
        for key in ('loss_re_ct', 'loss_re_drr', 'loss_re_2d', 'full_2d', 'hidden_2d', 'full_3d', 'hidden_3d'):
            v = np.array([r[key] if key in r else r['student_recon'][key] for r in rows])
            summary[f'mask{ratio:g}_{key}'] = (round(float(v.mean()), 5), round(float(v.std(ddof=1)), 5) if len(v) > 1 else 0.)
        for task in ('cls2d', 'patch3d'):
            for m in ('knn_acc_mean', 'linear_acc_mean'):
                v = np.array([r[task][m] for r in rows])
                summary[f'mask{ratio:g}_{task}_{m[:-5]}'] = (round(float(v.mean()), 4),
                                                             round(float(v.std(ddof=1)), 4) if len(v) > 1 else 0.)
    results['summary (mean, sd over seeds)'] = summary
    print(json.dumps(summary, indent=1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out)/'results.json').write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
