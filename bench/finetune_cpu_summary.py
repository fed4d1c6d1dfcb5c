"""Summarise the CPU-protocol fine-tuning evidence (issue 10): pretrained − scratch per task and label fraction.

Reads the runs of one `unimiss-experiments study --weights ... --tag TAG` (through `unimiss.experiments`' own
`list_runs` / `report_rows` / `summarize`: runs are grouped only when they differ in nothing but the seed) and writes
`bench/results/finetune_cpu_<date>.json` and `.md`: mean ± sd and n per cell, and the difference pretrained − scratch
with its sd, sqrt(sd_pretrained² + sd_scratch²), the paired sd (runs of one seed share the label subset and data
order), and whether the difference exceeds 2 sd.

    python bench/finetune_cpu_summary.py --runs-dir runs_cpu --tag 'cpu*' [--out bench/results/finetune_cpu_2026-12-02]
"""
import argparse
import datetime
import json
import math
import sys
from pathlib import Path

from unimiss.data import atomic_write
from unimiss.experiments import list_runs, mean_sd, report_rows, summarize


def differences(summary, rows) -> list[dict]:
    "One row per (experiment, label fraction, weights): pretrained and scratch mean ± sd, their difference and its sd."
    out = []
    for pre in (s for s in summary if s['init'] not in ('scratch', None)):
        name, params = json.loads(pre['setting'])
        strip = lambda p: {k: v for k, v in p.items() if k not in ('init', 'checkpoint')}
        scratch = [s for s in summary if s['init'] == 'scratch' and json.loads(s['setting'])[0] == name
                   and strip(json.loads(s['setting'])[1]) == strip(params)]
        if len(scratch) != 1: continue
        sc = scratch[0]
        by_seed = lambda cell: {r['seed']: r['value'] for r in rows if r['setting'] == cell['setting'] and r['status'] == 'ok'}
        p_seed, s_seed = by_seed(pre), by_seed(sc)
        paired = [p_seed[k] - s_seed[k] for k in sorted(set(p_seed) & set(s_seed))]
        diff = pre['mean'] - sc['mean']
        sd = math.sqrt((pre['sd'] or 0) ** 2 + (sc['sd'] or 0) ** 2) if pre['sd'] is not None and sc['sd'] is not None else None
        pm, psd = mean_sd(paired) if paired else (None, None)
        out.append(dict(experiment=name, metric=pre['metric'], label_fraction=pre['label_fraction'], weights=params.get('checkpoint'),
                        scratch_mean=sc['mean'], scratch_sd=sc['sd'], scratch_n=sc['n'], scratch_seeds=sc['seeds'],
                        pretrained_mean=pre['mean'], pretrained_sd=pre['sd'], pretrained_n=pre['n'], pretrained_seeds=pre['seeds'],
                        diff=diff, diff_sd=sd, above_2sd=bool(sd is not None and diff > 2 * sd),
                        paired_diffs=paired, paired_diff_sd=psd, above_2_paired_sd=bool(psd is not None and pm > 2 * psd),
                        scratch_values=[s_seed[k] for k in sorted(s_seed)], pretrained_values=[p_seed[k] for k in sorted(p_seed)]))
    return sorted(out, key=lambda r: (r['experiment'], r['label_fraction'], str(r['weights'])))


def diagnose(weights:str, n_images:int=64) -> dict:
    "Does the pretrained backbone load fully into both tasks' networks, and how do its features' scales compare to a random one's?"
    import torch
    from unimiss.finetune import build_model, load_pretrained
    from unimiss.evaluate import extract_features, probe_backbone, xray_input
    from unimiss.samples import data_dir
    out = {}
    for task, kind, d, n, size in (('cls2d', 'classification', 2, 2, (64, 64)), ('seg3d', 'segmentation', 3, 8, (16, 64, 64))):
        torch.manual_seed(0)
        m = build_model(kind, d, n, 'tiny', size)
        info = load_pretrained(m, weights)
        out[f'load_{task}'] = dict(loaded=info['loaded'], of=len(m.backbone.state_dict()), missing=len(info['missing']),
                                   dropped_other_modality=len(info['dropped']), resized=len(info['resized']))
    src = data_dir(None)/'sources'/'br35h'
    paths = sorted(src.glob('*/*.jpg'))[::50][:n_images]
    if not paths: raise SystemExit(f"error: no Br35H images under {src}: point UNIMISS_DATA at the sample cache the runs used")
    x = torch.stack([xray_input(q, 64) for q in paths])
    for name, ckpt in (('pretrained', weights), ('random', 'random')):
        f = extract_features(probe_backbone(ckpt, 'tiny', 2, 64), x)
        out[f'cls_features_{name}'] = dict(mean_norm=round(float(f.norm(dim=1).mean()), 3),
                                           mean_abs=round(float(f.abs().mean()), 4),
                                           sd_over_images=round(float(f.std(0).mean()), 4),
                                           mean_cosine_between_images=round(float((torch.nn.functional.normalize(f, dim=1) @
                                               torch.nn.functional.normalize(f, dim=1).T).mean()), 4))
    return out


def fmt(m, sd, n=None) -> str:
    return f"{m:.3f}" + (f" ± {sd:.3f}" if sd is not None else '') + (f" (n={n})" if n is not None else '')


def markdown(diffs) -> str:
    lines = ['| task | metric | labels | weights | scratch | pretrained | pretrained − scratch | > 2 sd? | paired diffs (per seed) |',
             '|---|---|---|---|---|---|---|---|---|']
    for d in diffs:
        lines.append(f"| {d['experiment']} | {d['metric']} | {d['label_fraction']:.0%} | {Path(str(d['weights'])).parent.name} | "
                     f"{fmt(d['scratch_mean'], d['scratch_sd'], d['scratch_n'])} | "
                     f"{fmt(d['pretrained_mean'], d['pretrained_sd'], d['pretrained_n'])} | {fmt(d['diff'], d['diff_sd'])} | "
                     f"{'yes' if d['above_2sd'] else 'no'} | {', '.join(f'{v:+.3f}' for v in d['paired_diffs'])} |")
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs-dir', required=True)
    p.add_argument('--tag', default='cpu*', help="tag pattern of the study's runs (default cpu*)")
    p.add_argument('--out', default=None, help='output path without suffix (default bench/results/finetune_cpu_<date>)')
    p.add_argument('--weights', default=None, help='also record the diagnostics of these weights (`diagnose`)')
    a = p.parse_args(argv)
    runs = list_runs(a.runs_dir, tag=a.tag)
    if not runs: print(f'error: no runs matching {a.tag!r} under {a.runs_dir}', file=sys.stderr); return 2
    rows = report_rows(runs)
    summary = summarize(rows)
    diffs = differences(summary, rows)
    out = Path(a.out or Path(__file__).resolve().parent/'results'/f"finetune_cpu_{datetime.date.today().isoformat()}")
    res = dict(runs_dir=str(Path(a.runs_dir).resolve()), tag=a.tag, n_runs=len(runs),
               failed=[r['tag'] for r in rows if r['status'] != 'ok'],
               wall_s={r['experiment']: round(sum(x['wall_s'] or 0 for x in rows if x['experiment'] == r['experiment']), 1)
                       for r in rows},
               cells=[{k: v for k, v in s.items() if k != 'setting'} | dict(checkpoint=json.loads(s['setting'])[1].get('checkpoint'))
                      for s in summary],
               differences=diffs,
               runs=[{k: r[k] for k in ('experiment', 'tag', 'status', 'init', 'label_fraction', 'seed', 'metric', 'value', 'wall_s')}
                     for r in rows])
    if a.weights: res['diagnostics'] = diagnose(a.weights)
    atomic_write(out.with_suffix('.json'), (json.dumps(res, indent=1) + '\n').encode())
    table = markdown(diffs)
    print(table)
    print(f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
