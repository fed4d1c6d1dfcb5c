"The oneDNN matrix products of `unimiss.mit.linear` on the CPU: same numbers as torch's, chosen by env or call."
import ast, os
import subprocess
import sys

import pytest
import torch

from unimiss import mit
from unimiss.mit import mit_micro, onednn_matmul_available, set_cpu_matmul
from unimiss.pretrain import SelfDistillation, build_backbone, load_config

needs_onednn = pytest.mark.skipif(not onednn_matmul_available(), reason='torch built without oneDNN')


def _run(code, **env):
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != mit.CPU_MATMUL_ENV} | env)


def test_environment_chooses_and_bad_value_names_the_variable():
    ok = _run("from unimiss.mit import cpu_matmul; print(cpu_matmul())", UNIMISS_CPU_MATMUL='torch')
    assert ok.returncode == 0 and ok.stdout.strip() == 'torch'
    bad = _run("from unimiss.mit import cpu_matmul; cpu_matmul()", UNIMISS_CPU_MATMUL='mkl')
    assert bad.returncode != 0
    assert "UNIMISS_CPU_MATMUL must be one of 'onednn', 'torch', got 'mkl'" in bad.stderr


def test_default_follows_the_cpu_vendor():
    "oneDNN by default only on AMD CPUs (measured faster there, no faster on an Intel Xeon); the subprocess agrees."
    assert [mit.default_cpu_matmul(v) for v in ('GenuineIntel', '', 'Apple M2')] == ['torch'] * 3
    assert mit.default_cpu_matmul('AuthenticAMD') == ('onednn' if onednn_matmul_available() else 'torch')
    out = _run("from unimiss.mit import cpu_matmul, cpu_vendor; print(repr((cpu_vendor(), cpu_matmul())))")
    vendor, backend = ast.literal_eval(out.stdout.strip())
    assert vendor == mit.cpu_vendor() and backend == mit.default_cpu_matmul(vendor)
    forced = _run("from unimiss.mit import cpu_matmul; print(cpu_matmul())", UNIMISS_CPU_MATMUL='onednn')
    if onednn_matmul_available(): assert forced.stdout.strip() == 'onednn'


def _grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_onednn
@pytest.mark.parametrize('shape', [(2, 3, 64, 64), (2, 1, 16, 64, 64)])
def test_model_output_and_gradients_match_torch(shape):
    torch.manual_seed(0)
    model, x = mit_micro(), torch.randn(shape)
    previous = set_cpu_matmul('onednn')
    try:
        out_dnn, g_dnn = _grads(model, x)
        set_cpu_matmul('torch')
        out_ref, g_ref = _grads(model, x)
    finally: set_cpu_matmul(previous)
    torch.testing.assert_close(out_dnn, out_ref, rtol=1e-4, atol=1e-5)
    assert g_dnn.keys() == g_ref.keys()
    for n in g_ref: torch.testing.assert_close(g_dnn[n], g_ref[n], rtol=1e-3, atol=1e-5, msg=n)


@needs_onednn
def test_pretraining_step_matches_torch_and_repeats_bit_exactly():
    cfg = load_config(arch='micro', out_dim=256, batch_size_3d=2, img_size_3d=(16, 64, 64), synthetic=1,
                      num_workers=0, progress=False, drop_path_rate=0.)
    views = [torch.rand(2, 1, 16, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    hp = dict(lr=1e-3, weight_decay=0.04, momentum=0.99, teacher_temp=0.04)
    def losses(backend):
        previous = set_cpu_matmul(backend)
        try:
            torch.manual_seed(0)
            sd = SelfDistillation(build_backbone(cfg), cfg)
            return [sd.step(views, **hp)['loss'] for _ in range(3)]
        finally: set_cpu_matmul(previous)
    dnn = losses('onednn')
    assert dnn == losses('onednn')  # deterministic: a resumed run repeats its steps
    assert dnn == pytest.approx(losses('torch'), rel=1e-4)
