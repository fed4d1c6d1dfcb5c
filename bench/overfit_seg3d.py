"""Overfit check of the 3D segmentation fine-tuning engine on the sample CT task (`sample_ct_seg`).

Trains on a few slabs of the sample chest CT and evaluates on the SAME slabs with the engine's own pieces
(`unimiss.protocols`: the protocol's reader/labels; `unimiss.casedata`: `train_transform` patch sampling;
`unimiss.engine`: `train` with `make_loss` (deep supervision), sliding-window `evaluate`).
A correct engine memorises a few cases: mean Dice >= 0.9.
The held-out Dice (the protocol's validation slabs) is reported beside it; it is not expected to be high.
The protocol's random flips are off unless `--flips` (memorising needs no invariance to them); intensity jitter stays.
The result also records how the sampler sees the classes (`patch_stats`: % of sampled patches holding each class).

    python bench/overfit_seg3d.py                      # prints the Dice, writes bench/results/overfit_seg3d_<date>.json
    python bench/overfit_seg3d.py --iters 20 --json    # a quick look
    python bench/overfit_seg3d.py --seeds 0 1 --verbose  # Dice mean ± sd over two seeds, the loss logged per epoch
"""
import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unimiss.casedata import CaseDataset, train_transform
from unimiss.config import seed_everything
from unimiss.engine import evaluate, train
from unimiss.finetune import load_config
from unimiss.protocols import PROTOCOLS, get_splits
from unimiss.reports import json_safe
from unimiss.data import atomic_write
from unimiss.finetune import build_model

TARGET = 0.9


def patch_stats(cases, pr, cfg, flip_axes, n:int=100) -> dict:
    "How the training sampler sees the classes: % of `n` sampled patches holding each one, and its mean % of their voxels."
    tf = train_transform(pr.kind, pr.spatial_dims, cfg.img_size, flip_axes)
    tf.set_random_state(seed=cfg.seed + 1)  # its own random state: the training draws are left as they are
    ds = CaseDataset(cases, None, tf, True, 1)
    labels = [ds[i % len(ds)]['label'][0].long() for i in range(n)]
    classes = pr.classes
    return dict(n_patches=n,
                present_pct={c: round(100 * float(np.mean([(l == k).any().item() for l in labels])), 1) for k, c in enumerate(classes)},
                voxel_pct={c: round(100 * float(np.mean([(l == k).float().mean().item() for l in labels])), 2) for k, c in enumerate(classes)})


def overfit(slabs=(2, 3), # training slabs (indices of `slab_bounds`) trained on and evaluated on
            arch:str='micro', img_size=(16, 128, 128), spacing=(3.0, 3.0, 2.5), # model input crop, voxel size (x, y, z) mm
            iters:int=800, epochs:int=8, batch_size:int=2, lr:float=1e-2, seed:int=0,
            deep_supervision:bool=True, held_out:bool=True, out_dir=None,
            flips:bool=False, # the protocol's random flips too (off: memorising needs no invariance to them)
           ) -> dict:
    "Train on `slabs` of the sample CT, evaluate on the same slabs (and on the validation slabs); returns the result."
    t0 = time.perf_counter()
    pr = PROTOCOLS['sample_ct_seg']
    n_slabs = pr.options['n_slabs']
    val_slabs = list(pr.options['val_slabs'])
    if set(slabs) & set(val_slabs): raise ValueError(f"slabs {list(slabs)} overlap the validation slabs {val_slabs}")
    tmp = tempfile.TemporaryDirectory() if out_dir is None else None
    out = Path(out_dir or tmp.name)
    cfg = load_config(dict(protocol='sample_ct_seg', arch=arch, img_size=tuple(img_size), spacing=tuple(spacing),
                                 epochs=epochs, iters_per_epoch=max(1, iters // epochs), batch_size=batch_size, lr=lr,
                                 seed=seed, deep_supervision=deep_supervision, drop_path_rate=0.0, device='cpu',
                                 progress=False, out_dir=str(out), options=dict(n_slabs=n_slabs, val_slabs=val_slabs)))
    seed_everything(cfg.seed, deterministic=True)
    device = torch.device('cpu')
    splits = get_splits(cfg)
    train_cases = [c for c in splits['train'] if int(c['name'].removeprefix('slab').split('_')[0]) in slabs]
    names = [c['name'] for c in train_cases]
    if len(train_cases) != len(slabs): raise ValueError(f"slabs {list(slabs)} not all among the training slabs "
                                                        f"{[c['name'] for c in splits['train']]}")
    flip_axes = pr.flip_axes if flips else ()
    tf = train_transform(pr.kind, pr.spatial_dims, cfg.img_size, flip_axes)
    tf.set_random_state(seed=cfg.seed)
    train_ds = CaseDataset(train_cases, None, tf, True, 1)
    patches = patch_stats(train_cases, pr, cfg, flip_axes)
    same_ds = CaseDataset(train_cases, None, None, True, 1)
    model = build_model(pr.kind, pr.spatial_dims, pr.num_outputs, cfg.arch, cfg.img_size,
                        deep_supervision=cfg.deep_supervision, drop_path_rate=cfg.drop_path_rate).to(device)
    history, _ = train(model, pr, cfg, train_ds, None, device, out)
    t_train = time.perf_counter() - t0
    fit, _, _ = evaluate(model, pr, cfg, same_ds, device, n_examples=0)
    result = dict(check='overfit_seg3d', protocol='sample_ct_seg', trained_on=names, arch=cfg.arch,
                  img_size=list(cfg.img_size), spacing=list(cfg.spacing), iters=len(history) * cfg.iters_per_epoch,
                  batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, deep_supervision=cfg.deep_supervision,
                  flips=list(flip_axes) if flip_axes is not None else 'all',
                  train_loss=[round(h['train_loss'], 4) for h in history],
                  patch_stats=patches, overfit_mean_dice=fit['mean_dice'], overfit_dice=fit['dice'], target=TARGET,
                  passed=bool(fit['mean_dice'] >= TARGET))
    if held_out:
        val_ds = CaseDataset(splits['val'], None, None, True, 1)
        val, _, _ = evaluate(model, pr, cfg, val_ds, device, n_examples=0)
        result.update(held_out_on=[c['name'] for c in splits['val']], held_out_mean_dice=val['mean_dice'],
                      held_out_dice=val['dice'])
    result.update(train_seconds=round(t_train, 1), total_seconds=round(time.perf_counter() - t0, 1),
                  torch=torch.__version__, threads=torch.get_num_threads())
    if tmp is not None: tmp.cleanup()
    return result


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(runs:list[dict]) -> dict:
    "One result for the runs of several seeds: Dice mean and sd (ddof 1) over seeds, per structure too; the runs kept."
    r = {k: v for k, v in runs[0].items() if k not in ('seed', 'train_loss', 'train_seconds', 'total_seconds')
         and not k.startswith(('overfit_', 'held_out_dice', 'held_out_mean'))}
    r['seeds'] = [x['seed'] for x in runs]
    r['train_loss'] = [round(float(v), 4) for v in np.mean([x['train_loss'] for x in runs], 0)]
    for what in ('overfit', 'held_out'):
        if f'{what}_mean_dice' not in runs[0]: continue
        r[f'{what}_mean_dice'], r[f'{what}_mean_dice_sd'] = _mean_sd([x[f'{what}_mean_dice'] for x in runs])
        per = {n: _mean_sd([x[f'{what}_dice'][n] for x in runs]) for n in runs[0][f'{what}_dice']}
        r[f'{what}_dice'] = {n: m for n, (m, _) in per.items()}
        r[f'{what}_dice_sd'] = {n: sd for n, (_, sd) in per.items()}
    r['passed'] = bool(r['overfit_mean_dice'] >= TARGET)
    r['total_seconds'] = round(sum(x['total_seconds'] for x in runs), 1)
    r['runs'] = runs
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--slabs', type=int, nargs='+', default=[2, 3], help='training slabs trained and evaluated on')
    p.add_argument('--arch', default='micro')
    p.add_argument('--img-size', type=int, nargs=3, default=[16, 128, 128],
                   help='training crop (D, H, W); 128 spans the 120x120 slabs in-plane: 16x64x64 crops do not fit in 1200 iterations')
    p.add_argument('--spacing', type=float, nargs=3, default=[3.0, 3.0, 2.5])
    p.add_argument('--iters', type=int, default=800)
    p.add_argument('--epochs', type=int, default=8, help='the iterations are logged in this many epochs')
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--lr', type=float, default=1e-2, help='AdamW, poly decay (1e-3 is far too slow from scratch)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0], help='one run per seed; the Dice is reported as mean ± sd')
    p.add_argument('--no-deep-supervision', action='store_true')
    p.add_argument('--flips', action='store_true', help="also the protocol's random flips (harder to memorise)")
    p.add_argument('--out', default='', help='JSON result file (default bench/results/overfit_seg3d_<date>.json)')
    p.add_argument('--json', action='store_true', help='print the result as one JSON line')
    p.add_argument('--verbose', action='store_true', help='log the training loss per epoch as it goes (stderr)')
    a = p.parse_args(argv)
    if a.verbose: logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    try:
        r = summarise([overfit(tuple(a.slabs), a.arch, a.img_size, a.spacing, a.iters, a.epochs, a.batch_size, a.lr, s,
                               not a.no_deep_supervision, flips=a.flips) for s in a.seeds])
    except (ValueError, FileNotFoundError) as e:
        print(f"overfit_seg3d: {e}", file=sys.stderr); return 1
    path = Path(a.out or Path(__file__).parent / 'results' / f"overfit_seg3d_{datetime.date.today()}.json")
    atomic_write(path, json.dumps(json_safe(r), indent=1))
    if a.json: print(json.dumps(json_safe(r)))
    else:
        print(f"overfit mean Dice {r['overfit_mean_dice']:.3f} ± {r['overfit_mean_dice_sd']:.3f} on {r['trained_on']}, "
              f"seeds {r['seeds']} (target {TARGET}: {'PASS' if r['passed'] else 'FAIL'}); held-out mean Dice "
              f"{r.get('held_out_mean_dice', float('nan')):.3f} ± {r.get('held_out_mean_dice_sd', float('nan')):.3f}")
        print('  per structure (overfit):', {k: round(v, 3) for k, v in r['overfit_dice'].items()})
        if 'held_out_dice' in r: print('  per structure (held-out):', {k: round(v, 3) for k, v in r['held_out_dice'].items()})
        print('  % of sampled training patches holding each class:', r['patch_stats']['present_pct'])
        print(f"  training loss per epoch: {r['train_loss']}; {r['total_seconds']} s; result in {path}")
    return 0 if r['passed'] else 2


if __name__ == '__main__':
    sys.exit(main())
