"""How much a random-init MiT's output agrees between two views of the same image (the signal self-distillation
starts from). For N images of the sample corpus: the mean centred cosine between the CLS embeddings of the two
augmented views of each image ('same') and of different images ('other'), for the official 2D recipe, a milder
one, and single transforms (2-pixel shift, 8-pixel shift, horizontal flip, x1.1 intensity).

    python bench/view_agreement.py [--n 32] [--size 64] [--json]
"""
import argparse, json

import torch
import torch.nn.functional as F

from unimiss import samples
from unimiss.data import Dataset2D, XrayView
from unimiss.mit import mit_tiny


def agreement(fa, fb):
    "Mean centred cosine of matching rows ('same') and of non-matching rows ('other')."
    m = torch.cat([fa, fb]).mean(0)
    c = F.normalize(fa - m, dim=-1) @ F.normalize(fb - m, dim=-1).T
    n = len(c)
    return dict(same=round(c.diag().mean().item(), 3), other=round((c.sum() - c.diag().sum()).item() / (n * n - n), 3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=32, help='images')
    p.add_argument('--size', type=int, default=64, help='crop side in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true')
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    root = samples.prepare_samples(progress=False)['root']
    model = mit_tiny(spatial_dims=2, img_size2d=a.size).eval()
    recipes = {'official': (XrayView(p_blur=0.5), XrayView(p_blur=1.0)),
               'mild': tuple(XrayView(scale=(0.4, 1.0), blur_sigma=(0.1, 0.6), p_jitter=0., p_blur=pb) for pb in (.5, 1.))}
    res = {}
    with torch.no_grad():
        for name, views in recipes.items():
            ds = Dataset2D(f'{root}/2d_list.txt', root=root, img_size=a.size, views=views, seed=a.seed)
            idx = torch.randperm(len(ds))[:a.n].tolist()
            pairs = [ds[i] for i in idx]
            res[f'views_{name}'] = agreement(model(torch.stack([v[0] for v in pairs])),
                                             model(torch.stack([v[1] for v in pairs])))
        x = torch.stack([v[0] for v in pairs])
        f = model(x)
        for name, y in (('shift_2px', x.roll(2, -1)), ('shift_8px', x.roll(8, -1)), ('flip', x.flip(-1)),
                        ('intensity_x1.1', x * 1.1)):
            res[name] = agreement(f, model(y))
    if a.json: print(json.dumps(dict(bench='view_agreement', n=a.n, size=a.size, **res)))
    else:
        for k, v in res.items(): print(f"{k:>16}: same image {v['same']:+.3f}   other images {v['other']:+.3f}")
    return res


if __name__ == '__main__':
    main()
