"""At initialisation (or from a checkpoint): how different are the teacher's logits of different X-rays of the CPU
protocol, and how sharp is the centred teacher at each temperature? (issue 10; numbers quoted in configs/pretrain_cpu.yaml)

    python bench/diag_teacher_init.py DATA_DIR [CHECKPOINT]

DATA_DIR is the folder `unimiss.evaluate.cpu_corpus` wrote the CPU protocol's lists into (`cpu_protocol/pretrain_2d.txt`)."""
import math, sys
import torch, torch.nn.functional as F
from unimiss.pretrain import load_config, build_backbone, build_datasets, SelfDistillation
from unimiss.evaluate import arm_config
from unimiss.checkpoint import read_checkpoint
cfg = arm_config('2d_only', 'configs/pretrain_cpu.yaml', data_dir=sys.argv[1], list_2d='cpu_protocol/pretrain_2d.txt')
torch.manual_seed(0)
ds = build_datasets(cfg)[2]
x = torch.stack([ds[i][0] for i in range(0, 2400, 37)])
sd = SelfDistillation(build_backbone(cfg), cfg)
ck = sys.argv[2] if len(sys.argv) > 2 else None
if ck: sd.load_state_dict(read_checkpoint(ck))
with torch.no_grad():
    f = sd.teacher.backbone(x); z = sd.teacher.head.project(f); t = sd.teacher.head.logits(z)
fn = F.normalize(f, dim=1)
off = lambda s: float((s.sum() - s.diag().sum()) / (len(s) * (len(s) - 1)))
print('n', len(x), 'mean pairwise cos: backbone CLS', round(off(fn @ fn.T), 4), ' head z', round(off(z @ z.T), 4))
c = t - t.mean(0, keepdim=True)
print('logit std over prototypes', round(float(t.std(1).mean()), 4), ' centred logit std across images', round(float(c.std(0).mean()), 4))
for T in (0.04, 0.02, 0.01, 0.005):
    p = F.softmax(c / T, 1); print('teacher_temp', T, 'entropy of centred teacher', round(float(-(p * p.clamp_min(1e-30).log()).sum(1).mean()), 3), 'of', round(math.log(t.shape[1]), 3))
