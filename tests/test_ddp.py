"""Distributed pretraining on CPU: 2 processes (gloo) under torchrun, one X-ray and one CT epoch.

Checks that both ranks end with identical students and teachers, that they trained on different data, and that
the loss centre equals the EMA of the mean teacher output over *all* ranks.

Run by pytest; torchrun runs this same file as the worker (`python -m torch.distributed.run ... test_ddp.py OUT`).
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

TINY = dict(arch='micro', img_size_2d=64, img_size_3d=[16, 64, 64], out_dim=64, batch_size_2d=1, batch_size_3d=1,
            synthetic=4, num_workers=0, progress=False, epochs=2, interval=1, warmup_epochs=1, drop_path_rate=0.1)


def worker(out:Path):
    "One rank: train, then save this rank's networks, centre and every teacher output the centre was fed."
    from unimiss import pretrain as P
    from unimiss.ssl import DINOLoss
    fed, trainers = [], []
    update = DINOLoss.update_center
    def recording_update(self, teacher_output):
        fed.append(teacher_output.detach().clone())
        return update(self, teacher_output)
    DINOLoss.update_center = recording_update
    init = P.SelfDistillation.__init__
    def keep(self, *a, **k):
        init(self, *a, **k)
        trainers.append(self)
    P.SelfDistillation.__init__ = keep
    res = P.pretrain(P.load_config(TINY | dict(output_dir=str(out/'run'))))
    sd, rank = trainers[0], int(os.environ['RANK'])
    torch.save(dict(student=sd.student.state_dict(), teacher=sd.teacher.state_dict(), center=sd.loss.center,
                    fed=fed, distributed=type(sd.model).__name__, iteration=res['iteration']), out/f'rank{rank}.pt')


def test_two_cpu_processes(tmp_path):
    env = os.environ | dict(OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        __file__, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r0, r1 = (torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in (0, 1))
    assert r0['distributed'] == 'DistributedDataParallel'
    assert r0['iteration'] == r1['iteration'] == 4  # 4 items split over 2 ranks, batch 1, 2 epochs
    for net in ('student', 'teacher'):
        for k, v in r0[net].items():
            assert torch.equal(v, r1[net][k]), f"{net} {k} differs between ranks"
    # each rank trained on its own share of the data...
    assert not torch.equal(r0['fed'][0], r1['fed'][0])
    # ...and the centre is the EMA of the teacher mean over both ranks
    center = torch.zeros(1, TINY['out_dim'])
    for a, b in zip(r0['fed'], r1['fed']):
        center = 0.9 * center + 0.1 * torch.cat([a, b]).float().mean(0, keepdim=True)
    torch.testing.assert_close(r0['center'], center, rtol=1e-5, atol=1e-6)
    assert torch.equal(r0['center'], r1['center'])
    ck = torch.load(tmp_path/'run'/'checkpoint.pth', weights_only=True)
    assert ck['world_size'] == 2 and len(ck['rng']) == 2


if __name__ == '__main__':
    worker(Path(sys.argv[1]))
