"""Kill test: `kill -9` pretraining and `unimiss-preprocess` at random moments, run the same command again until it
finishes, and check that the result is bit-identical to an uninterrupted run with nothing left behind.

    python bench/kill_test.py                       # 5 random kills + 1 at a write of each; JSON lines, a summary
    python bench/kill_test.py --kills 10 --seed 1   # more kills, other moments
    python bench/kill_test.py --only preprocess

Each trial starts from an empty output folder, kills the command once at a moment drawn uniformly over the duration
of the uninterrupted run (imports included: a kill before the first write is a valid moment too), then runs the same
command to the end; `--at-write N` more trials kill it the moment a temporary file appears in its output folder
(a writer caught half-way: the next run must delete what it left). Compared with the uninterrupted run:
pretraining's final `checkpoint.pth` (student, teacher, optimizer, centres, epoch, iteration, random states), the
epoch records of `log.jsonl` and the exported teacher; preprocessing's sub-volumes, list files and PNGs byte for
byte. Left behind: any `.tmp` file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(REPO))
PRETRAIN = dict(arch='micro', img_size_2d=64, img_size_3d=[16, 64, 64], out_dim=32, batch_size_2d=2, batch_size_3d=1,
                synthetic=4, num_workers=0, progress=False, warmup_epochs=1, interval=1, lr=5e-3, epochs=4, save_every=2)


def _cmd_pretrain(work:Path, out:Path) -> list:
    cfg = work/'pretrain.yaml'
    if not cfg.exists(): cfg.write_text(yaml.safe_dump(PRETRAIN))
    return [sys.executable, '-m', 'unimiss.pretrain', '--config', str(cfg), '--output_dir', str(out)]


N_CT, N_XRAY = 4, 12  # inputs of the preprocessing trials (`--small`: 2 and 4)


def _inputs_preprocess(work:Path) -> Path:
    "Phantom CT volumes and radiographs under `work/src`."
    import nibabel as nib
    from unimiss.data import phantom_ct, phantom_xray, write_image
    src = work/'src'
    if src.exists(): return src
    for i in range(N_CT):
        (src/'ct').mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(phantom_ct((96, 96, 40), i), np.diag([0.8, 0.8, 1.5, 1.])), src/'ct'/f'case{i}.nii.gz')
    for i in range(N_XRAY): write_image(src/'xray'/f'x{i:02d}.png', phantom_xray(300, i))
    return src


def _cmd_preprocess(work:Path, out:Path) -> list:
    src = _inputs_preprocess(work)
    # ct then xray in one shell line, as a data-preparation script would run them
    py = sys.executable
    return ['sh', '-c', f'"{py}" -m unimiss.preprocess ct "{src}/ct" "{out}/ct" --tile-depth 8 --stride 4 --no-progress && '
                        f'"{py}" -m unimiss.preprocess xray "{src}/xray" "{out}/xray" --size 128 --no-progress']


def _run(cmd, kill_after:float|None=None, at_write:Path|None=None) -> tuple[int, float]:
    "Run `cmd` in its own process group; SIGKILL the group after `kill_after` s, or once a `.tmp` file shows in `at_write`."
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        while p.poll() is None:
            if kill_after is not None and (time.time() - t0 >= kill_after or (at_write and at_write.exists() and _leftovers(at_write))):
                os.killpg(p.pid, signal.SIGKILL); p.wait()
                return -9, time.time() - t0
            time.sleep(0.002)
        if p.returncode:
            err.seek(0); raise RuntimeError(f"{cmd[:4]} failed ({p.returncode}): {err.read().decode()[-1500:]}")
    return 0, time.time() - t0


def _digest_pretrain(out:Path) -> dict:
    "What must be identical after resuming: checkpoint contents, epoch log records, exported teacher."
    ck = torch.load(out/'checkpoint.pth', weights_only=True)
    h = hashlib.sha256()
    def feed(x, key=''):
        if isinstance(x, dict):
            for k in sorted(x, key=str): feed(x[k], f'{key}.{k}')
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x): feed(v, f'{key}[{i}]')
        elif torch.is_tensor(x): h.update(key.encode()); h.update(x.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        else: h.update(f'{key}={x!r}'.encode())
    feed({k: v for k, v in ck.items() if k != 'config'})
    epochs = [{k: v for k, v in json.loads(l).items() if k not in ('seconds', 'time')}
              for l in (out/'log.jsonl').read_text().splitlines() if '"epoch"' in l and '"type": "epoch"' in l]
    teacher = torch.load(out/'teacher_backbone.pth', weights_only=True)['state_dict']
    return dict(checkpoint=h.hexdigest(), epochs=json.dumps(epochs, sort_keys=True),
                teacher=hashlib.sha256(b''.join(v.numpy().tobytes() for _, v in sorted(teacher.items()))).hexdigest())


def _digest_preprocess(out:Path) -> dict:
    "SHA-256 of every output file but the manifests and records (they hold absolute paths and file times)."
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob('*'))
            if p.is_file() and p.name != 'manifest.json' and '.records' not in p.parts}


def _leftovers(out:Path) -> list:
    return sorted(str(p.relative_to(out)) for p in out.rglob('*') if '.tmp' in p.name)


def trial(kind:str, work:Path, kill_after:float, ref:dict, at_write:bool=False) -> dict:
    out = work/f'run-{kill_after:.3f}{"-w" if at_write else ""}'
    cmd = (_cmd_pretrain if kind == 'pretrain' else _cmd_preprocess)(work, out)
    status, t = _run(cmd, kill_after, out if at_write else None)
    killed = status == -9
    left_after_kill = _leftovers(out) if out.exists() else []
    resumes = 0
    while status != 0 or resumes == 0:  # the same command again, to the end
        status, _ = _run(cmd); resumes += 1
    got = (_digest_pretrain if kind == 'pretrain' else _digest_preprocess)(out)
    return dict(kind=kind, at_write=at_write, kill_after_s=round(kill_after, 3), killed=killed,
                killed_at_s=round(t, 3), tmp_after_kill=left_after_kill,
                identical=got == ref, differing=sorted(k for k in set(ref) | set(got) if ref.get(k) != got.get(k))[:5],
                left_behind=_leftovers(out))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--kills', type=int, default=5, help='kills per command (default 5)')
    p.add_argument('--seed', type=int, default=0, help='seed of the kill moments')
    p.add_argument('--at-write', type=int, default=1, help='more kills per command, each the moment a temporary file appears')
    p.add_argument('--only', choices=('pretrain', 'preprocess'), help='test one command only')
    p.add_argument('--work', help='work folder (default: a temporary one)')
    p.add_argument('--small', action='store_true', help='fewer inputs and epochs (the pytest case)')
    a = p.parse_args(argv)
    global N_CT, N_XRAY
    if a.small: N_CT, N_XRAY = 2, 4; PRETRAIN.update(epochs=2, save_every=1, synthetic=2)
    rng = random.Random(a.seed)
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        for kind in ('pretrain', 'preprocess'):
            if a.only and kind != a.only: continue
            w = work/kind; w.mkdir(parents=True, exist_ok=True)
            cmd = (_cmd_pretrain if kind == 'pretrain' else _cmd_preprocess)(w, w/'reference')
            _, duration = _run(cmd)
            ref = (_digest_pretrain if kind == 'pretrain' else _digest_preprocess)(w/'reference')
            rows = []
            for i in range(a.kills + a.at_write):
                r = trial(kind, w, (3 if i >= a.kills else rng.uniform(0.05, 1.0)) * duration, ref, at_write=i >= a.kills)
                rows.append(r); print(json.dumps(r), flush=True)
            summary[kind] = dict(kills=sum(r['killed'] for r in rows), at_write=sum(r['killed'] and r['at_write'] for r in rows),
                                 trials=len(rows), reference_s=round(duration, 1),
                                 identical=sum(r['identical'] for r in rows),
                                 tmp_files_after_kill=sum(bool(r['tmp_after_kill']) for r in rows),
                                 left_behind=sum(bool(r['left_behind']) for r in rows))
    print(json.dumps(dict(summary=summary)), flush=True)
    return summary


if __name__ == '__main__':
    s = main()
    ok = all(v['identical'] == v['trials'] and not v['left_behind'] for v in s.values())
    sys.exit(0 if ok else 1)
