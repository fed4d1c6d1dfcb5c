"""Parity with the official UniMiSS+ MiT+: load official-layout weights, compare outputs to the fixture.

The fixture (key lists + reference outputs of the official `UniMiSSPlus/MiTplus.py` under the deterministic weight
rule of the MiT fixture) is read from `$UNIMISS_PARITY_FIXTURES_PLUS`, else from tests/fixtures/official_mitplus;
the tests skip when neither exists. See the fixture's README for how it was made.
"""
import json

import numpy as np
import pytest
import torch

from unimiss.checkpoint import parity_input, rule_state_dict
from unimiss.mitplus import load_official_plus, plus_fixture_dir, to_official_plus_state_dict

FX = plus_fixture_dir()
pytestmark = pytest.mark.skipif(FX is None, reason="official MiT+ parity fixture not found: set "
                                                   "UNIMISS_PARITY_FIXTURES_PLUS to the folder holding keys_96.json")
RULES = {'chirp': 1e-4}   # the fixture's only rule (the plain `sin` rule is too ill-conditioned for MiT+: README)
TOL = dict(cls=2e-5, stats=2e-5, tokens=2e-3, recon=2e-5)   # float32 CPU tolerances, see the fixture README
META = json.loads((FX/'fixture.json').read_text()) if FX else {'cases': []}
CASES = [(c['build'], c['input'], c['full']) for c in META['cases']]


@pytest.fixture(scope='module')
def expected(): return np.load(FX/'expected.npz')


BUILDS = (96, 224)   # img_size2D of the official build: 96 is the released (pretraining) layout


@pytest.fixture(scope='module')
def loaded():
    "{build: (official key list, rule state dict, loaded MiTPlus)}, built once for the module."
    torch.set_num_threads(2)
    out = {}
    for build in BUILDS:
        keys = json.loads((FX/f'keys_{build}.json').read_text())
        sd = rule_state_dict(keys, RULES['chirp'])
        out[build] = keys, sd, load_official_plus(sd).eval()
    return out


@pytest.mark.parametrize('build', BUILDS)
def test_weight_rule(loaded, expected, build):
    _, sd, _ = loaded[build]
    np.testing.assert_allclose([v.double().sum().item() for v in sd.values()], expected[f'chirp.{build}.wsum'],
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize('build', BUILDS)
def test_roundtrip_bit_exact(loaded, build):
    keys, sd, model = loaded[build]
    assert model.img_size2d == (build, build)
    back = to_official_plus_state_dict(model)
    assert sorted(back) == sorted(k for k, _ in keys)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize('build', BUILDS)
def test_parameter_counts(loaded, build):
    model, p = loaded[build][2], META[f'params_{build}']
    count = lambda ps: sum(q.numel() for q in ps)
    assert count(model.parameters()) == p['total']
    assert count(model.parameters()) - count(q for _, q in model.dim_specific_parameters(3)) == p['used_2d']
    assert count(model.parameters()) - count(q for _, q in model.dim_specific_parameters(2)) == p['used_3d']
    enc = count(q for n, q in model.named_parameters() if not n.startswith(('decoder_stages', 'norm', 'recon')))
    assert enc == p['encoder']


@pytest.mark.parametrize('build,x,full', CASES, ids=[f'{b}.{x}' for b, x, _ in CASES])
def test_outputs(loaded, expected, build, x, full):
    "Encoder CLS, stem/stage statistics, stage-4 tokens and (where the official decoder runs) the reconstruction."
    rule, model = 'chirp', loaded[build][2]
    p = f'{rule}.{build}.{x}'
    with torch.no_grad():
        feats = model.forward_features(parity_input(x))
        image = model.recon(feats.decoder[-1], feats.encoder[:2]) if full else None
    np.testing.assert_allclose(feats.cls.numpy(), expected[p + '.cls'], rtol=0, atol=TOL['cls'])
    for k in range(5):
        m = feats.encoder[k].double().flatten(2)[0]
        np.testing.assert_allclose(m.mean(-1).numpy(), expected[p + f'.enc{k}_chmean'], rtol=0, atol=TOL['stats'],
                                   err_msg=f'enc{k} channel means')
        np.testing.assert_allclose(m.std(-1, unbiased=False).numpy(), expected[p + f'.enc{k}_chstd'], rtol=0,
                                   atol=TOL['stats'], err_msg=f'enc{k} channel stds')
    tokens = torch.cat([feats.cls[:, None], feats.encoder[5].flatten(2).transpose(1, 2)], 1)
    np.testing.assert_allclose(tokens.numpy(), expected[p + '.enc5'], rtol=0, atol=TOL['tokens'])
    if not full: return   # the official decoder cannot run this size (fixture.json: decoder_failures)
    r = image.double().flatten(2)[0]
    np.testing.assert_allclose(r.mean(-1).numpy(), expected[p + '.recon_chmean'], rtol=0, atol=TOL['stats'])
    np.testing.assert_allclose(r.std(-1, unbiased=False).numpy(), expected[p + '.recon_chstd'], rtol=0,
                               atol=TOL['stats'])
    np.testing.assert_allclose(image.flatten()[::61].numpy(), expected[p + '.recon_sub'], rtol=0, atol=TOL['recon'])
