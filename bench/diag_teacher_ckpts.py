"""Per epoch checkpoint of a CPU-protocol run: how alike are the teacher's outputs of different inputs (X-rays, CT
sub-volumes), and how sharp is the centred teacher with the run's own centre? (issue 10: why the CT teacher drifts to uniform)

    python bench/diag_teacher_ckpts.py RUN_DIR [--every 1]
"""
import math, sys, json
from pathlib import Path
import torch, torch.nn.functional as F
from unimiss.pretrain import load_config, build_backbone, build_datasets, SelfDistillation
from unimiss.checkpoint import read_checkpoint

run = Path(sys.argv[1])
cfg = load_config(run/'config.yaml')  # the run's own modalities
torch.manual_seed(0)
ds = build_datasets(cfg)
inputs = {}
if 2 in ds: inputs[2] = torch.stack([ds[2][i][0] for i in range(0, len(ds[2]), max(1, len(ds[2]) // 64))][:64])
if 3 in ds: inputs[3] = torch.stack([ds[3][i][0] for i in range(len(ds[3]))])  # every CT list entry (view 0)
sd = SelfDistillation(build_backbone(cfg), cfg)
off = lambda s: float((s.sum() - s.diag().sum()) / (len(s) * (len(s) - 1)))
ent = lambda p: float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())
cks = sorted(run.glob('checkpoint0*.pth'))
for ck in [None] + cks:
    if ck is not None: sd.load_state_dict(read_checkpoint(ck))
    row = dict(checkpoint=ck.name if ck else 'init')
    for d, x in inputs.items():
        with torch.inference_mode():
            f = sd.teacher.backbone(x); t = sd.teacher.head.logits(sd.teacher.head.project(f))
        fn = F.normalize(f, dim=1)
        c = sd.loss_for(d).center
        row |= {f'{d}d_cls_cos': round(off(fn @ fn.T), 4),
                f'{d}d_logit_sd_across': round(float(t.std(0).mean()), 4),
                f'{d}d_mean_minus_centre': round(float((t.mean(0) - c.flatten()).abs().mean()), 4),
                f'{d}d_entropy_run_centre': round(ent(F.softmax((t - c) / cfg.teacher_temp, 1)), 3),
                f'{d}d_entropy_own_mean': round(ent(F.softmax((t - t.mean(0)) / cfg.teacher_temp, 1)), 3),
                f'{d}d_n': len(x)}
    print(json.dumps(row), flush=True)
