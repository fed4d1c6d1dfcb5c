"""Distributed pretraining on CPU: 2 processes (gloo) under torchrun, one X-ray and one CT epoch, for UniMiSS and
for UniMiSS+ (`objective: unimiss_plus`, a CT+DRR epoch then an X-ray epoch of a small MiT+).

Checks that both ranks end with identical students and teachers, that they trained on different data, that the
loss centre equals the EMA of the mean teacher output over *all* ranks, and (UniMiSS+) that a run stopped after
its first epoch and resumed ends bit-identical to an uninterrupted one.

Run by pytest; torchrun runs this same file as the worker (`python -m torch.distributed.run ... test_ddp.py OUT [plus]`).
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

TINY = dict(arch='micro', img_size_2d=64, img_size_3d=[16, 64, 64], out_dim=64, batch_size_2d=1, batch_size_3d=1,
            synthetic=4, num_workers=0, progress=False, epochs=2, interval=1, warmup_epochs=1, drop_path_rate=0.1)

PLUS = TINY | dict(objective='unimiss_plus', arch='plus_micro', clip_grad=0.)


def recording(P):
    "Lists that fill with every teacher output the loss centre is fed and with every trainer `pretrain` builds."
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
    return fed, trainers


def worker(out:Path, plus:bool=False):
    "One rank: train, then save this rank's networks, centre and every teacher output the centre was fed."
    from unimiss import pretrain as P
    if plus: return plus_worker(out, P)
    fed, trainers = recording(P)
    res = P.pretrain(P.load_config(TINY | dict(output_dir=str(out/'run'))))
    sd, rank = trainers[0], int(os.environ['RANK'])
    torch.save(dict(student=sd.student.state_dict(), teacher=sd.teacher.state_dict(), center=sd.loss.center,
                    fed=fed, distributed=type(sd.model).__name__, iteration=res['iteration']), out/f'rank{rank}.pt')


def plus_worker(out:Path, P):
    "UniMiSS+ rank: an uninterrupted run, then the same run stopped after one epoch and resumed, in one process group."
    import torch.distributed as dist
    dist.init_process_group('gloo')  # `pretrain` uses an existing group as it is, so it can run twice
    fed, trainers = recording(P)
    res = P.pretrain(P.load_config(PLUS | dict(output_dir=str(out/'run'))))
    sd, rank, straight_fed = trainers[0], dist.get_rank(), list(fed)
    P.pretrain(P.load_config(PLUS | dict(output_dir=str(out/'split'), epochs_per_run=1)))
    P.pretrain(P.load_config(PLUS | dict(output_dir=str(out/'split'))))
    resumed = trainers[-1]
    dist.destroy_process_group()
    torch.save(dict(student=sd.student.state_dict(), teacher=sd.teacher.state_dict(), center=sd.loss.center,
                    fed=straight_fed, distributed=type(sd.model).__name__, iteration=res['iteration'],
                    resumed_student=resumed.student.state_dict(), resumed_teacher=resumed.teacher.state_dict(),
                    resumed_center=resumed.loss.center), out/f'rank{rank}.pt')


def run_workers(tmp_path, *args):
    env = os.environ | dict(OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        __file__, str(tmp_path), *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return [torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in (0, 1)]


def check_centre(r0, r1, out_dim):
    "The centre is the EMA of the teacher mean over both ranks, and the same on both."
    center = torch.zeros(1, out_dim)
    for a, b in zip(r0['fed'], r1['fed']):
        center = 0.9 * center + 0.1 * torch.cat([a, b]).float().mean(0, keepdim=True)
    torch.testing.assert_close(r0['center'], center, rtol=1e-5, atol=1e-6)
    assert torch.equal(r0['center'], r1['center'])


def test_two_cpu_processes(tmp_path):
    r0, r1 = run_workers(tmp_path)
    assert r0['distributed'] == 'DistributedDataParallel'
    assert r0['iteration'] == r1['iteration'] == 4  # 4 items split over 2 ranks, batch 1, 2 epochs
    for net in ('student', 'teacher'):
        for k, v in r0[net].items():
            assert torch.equal(v, r1[net][k]), f"{net} {k} differs between ranks"
    # each rank trained on its own share of the data...
    assert not torch.equal(r0['fed'][0], r1['fed'][0])
    # ...and the centre is the EMA of the teacher mean over both ranks
    check_centre(r0, r1, TINY['out_dim'])
    ck = torch.load(tmp_path/'run'/'checkpoint.pth', weights_only=True)
    assert ck['world_size'] == 2 and len(ck['rng']) == 2


def test_two_cpu_processes_unimiss_plus(tmp_path):
    r0, r1 = run_workers(tmp_path, 'plus')
    assert r0['distributed'] == 'DistributedDataParallel'
    # per rank: a CT+DRR epoch of 2 batches (4 items, 2 ranks, batch 1), then an X-ray epoch as long
    assert r0['iteration'] == r1['iteration'] == 4 and len(r0['fed']) == 4
    for net in ('student', 'teacher', 'resumed_student', 'resumed_teacher'):
        for k, v in r0[net].items():
            assert torch.equal(v, r1[net][k]), f"{net} {k} differs between ranks"
    for net in ('student', 'teacher'):  # stopped after the CT+DRR epoch and resumed: the same networks, bit for bit
        for k, v in r0[net].items():
            assert torch.equal(v, r0[f'resumed_{net}'][k]), f"resumed {net} {k} differs from the uninterrupted run"
    assert torch.equal(r0['center'], r0['resumed_center'])
    assert not torch.equal(r0['fed'][0], r1['fed'][0])
    check_centre(r0, r1, PLUS['out_dim'])
    ck = torch.load(tmp_path/'run'/'checkpoint.pth', weights_only=True)
    assert ck['world_size'] == 2 and ck['config']['objective'] == 'unimiss_plus'


if __name__ == '__main__':
    worker(Path(sys.argv[1]), plus=sys.argv[2:] == ['plus'])
