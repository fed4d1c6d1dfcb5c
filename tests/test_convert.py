"""`unimiss-convert` and the Hub-style folders: the SuPreM/VoCo re-hosted layout, unimiss checkpoints, bit-exact round
trips, refusals of bad safetensors files (one line on stderr, non-zero exit)."""
import argparse
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from unimiss.checkpoint import from_pretrained, load_backbone, load_official, main, to_official_checkpoint
from unimiss.mit import mit_micro, mit_tiny


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "unimiss.checkpoint", *map(str, args)], capture_output=True, text=True)


def _main(capsys, *args):
    "The command in this process (the subprocess form is tested once per test below): (exit code, stderr)."
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def _released(student, teacher):
    "The layout of self_supervised_unimiss_nnunet_*_5022.pth: the authors' main.py checkpoint."
    head = {"mlp.0.weight": torch.randn(16, 48), "last_layer.weight_g": torch.ones(8, 1), "last_layer.weight_v": torch.randn(8, 16)}
    ck = to_official_checkpoint(teacher, {}, student, {})
    for net, prefix in (("teacher", "head."), ("student", "module.head.")):
        ck[net].update({prefix + k: v for k, v in head.items()})
    return ck | dict(optimizer={"state": {}, "param_groups": []}, epoch=100, dino_loss={"center": torch.zeros(1, 8)},
                     args=argparse.Namespace(arch="model_tiny"))


def test_released_layout_converts_both_ways(tmp_path, capsys):
    torch.manual_seed(0)
    student, teacher = mit_tiny(), mit_tiny()
    src = tmp_path / "self_supervised_unimiss_nnunet_tiny_5022.pth"
    torch.save(_released(student, teacher), src)
    r = _cli(src, tmp_path / "hub", "--which", "student")
    assert r.returncode == 0, r.stderr
    hub = from_pretrained(tmp_path / "hub")
    assert _equal(hub, student) and hub.arch == "tiny"
    cfg = json.loads((tmp_path / "hub/config.json").read_text())
    assert cfg["model_type"] == "MiT" and cfg["backbone"]["depths"] == [1, 1, 1, 1] and cfg["backbone"]["img_size3d"] == [16, 96, 96]
    assert _equal(load_backbone(src), teacher)   # default: the teacher
    for fmt in ("official", "unimiss"):
        rc, err = _main(capsys, tmp_path / "hub", tmp_path / f"back_{fmt}.pth", "--format", fmt)
        assert rc == 0, err
        assert _equal(load_backbone(tmp_path / f"back_{fmt}.pth"), student)
    assert _equal(load_official(tmp_path / "back_official.pth"), student)   # the authors' layout, as their code reads it


def _unimiss_checkpoint(m):
    "A unimiss pretraining checkpoint (teacher backbone and head, the run's config)."
    return dict(teacher={f"backbone.{k}": v for k, v in m.state_dict().items()} | {"head.mlp.0.weight": torch.zeros(2, 2)},
                config=dict(arch="mit_micro", img_size_2d=224, img_size_3d=[16, 96, 96]), epoch=3)


def test_unimiss_pretraining_checkpoint_converts(tmp_path, capsys):
    torch.manual_seed(1)
    m = mit_micro(spatial_dims=(2, 3))
    torch.save(_unimiss_checkpoint(m), tmp_path / "checkpoint.pth")
    rc, err = _main(capsys, tmp_path / "checkpoint.pth", tmp_path / "hub")
    assert rc == 0, err
    assert _equal(from_pretrained(tmp_path / "hub"), m)


def test_bad_safetensors_and_layouts_are_refused_by_name(tmp_path, capsys):
    torch.manual_seed(2)
    src = tmp_path / "checkpoint.pth"
    torch.save(_unimiss_checkpoint(mit_micro()), src)
    assert _main(capsys, src, tmp_path / "hub")[0] == 0
    weights = tmp_path / "hub/model.safetensors"
    sd = load_file(weights)
    key = "stages.2.blocks.0.attn.kv.weight"   # (128, 64) in the micro model
    good = sd[key].clone()
    sd[key][3, 4] = float("nan")
    save_file(sd, weights)
    r = _cli(tmp_path / "hub", tmp_path / "out.pth", "--format", "official")
    assert r.returncode == 1 and f"tensor '{key}' has 1 non-finite" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.pth").exists()
    sd[key] = good[:, :-1].contiguous()
    save_file(sd, weights)
    rc, err = _main(capsys, tmp_path / "hub", tmp_path / "out.pth", "--format", "official")
    assert rc == 1 and f"{key}: {tuple(good[:, :-1].shape)} != {tuple(good.shape)}" in err
    weights.write_bytes(b"not safetensors")
    rc, err = _main(capsys, tmp_path / "hub", tmp_path / "out.pth")
    assert rc == 1 and "not a readable safetensors file" in err
    downstream = {"state_dict": {"transformer.patch_embed0.conv.weight": torch.zeros(32, 1, 7, 7, 7),
                                 "transformer.pos_embed1": torch.zeros(1, 8, 48)}}
    torch.save(downstream, tmp_path / "downstream.pth")
    rc, err = _main(capsys, tmp_path / "downstream.pth", tmp_path / "x")
    assert rc == 1 and "3D segmentation network of UniMiSS-code's Downstream" in err
