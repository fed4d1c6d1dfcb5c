"""Diagnostic for `overfit_seg3d.py`: fit ONE fixed batch (the centre 16x64x64 crops of slabs 2 and 3 of the sample CT,
no sampling, no augmentation) with MiT-micro and score it in eval mode every n/5 iterations.

If this fits (Dice ~1) while the sampled-patch overfit check does not, the model, loss and labels are right and the
difficulty lies in learning from randomly placed crops (crop size, schedule), not in a broken piece.

    python bench/overfit_seg3d_fixed_batch.py ds 1e-2 300     # Dice + CE with deep supervision, lr 1e-2, 300 iterations
    python bench/overfit_seg3d_fixed_batch.py nods 3e-3 300   # without deep supervision
    python bench/overfit_seg3d_fixed_batch.py ce 3e-3 300     # plain cross-entropy on the full-resolution output
"""
import sys
import time

import numpy as np
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from unimiss.finetune import build_model, load_config
from unimiss.metrics import deep_supervision_weights, segmentation_scores
from unimiss.protocols import PROTOCOLS, get_splits


def main(variant:str, lr:float, n:int):
    if variant not in ('ds', 'nods', 'ce') or n < 5: raise SystemExit("usage: overfit_seg3d_fixed_batch.py ds|nods|ce LR N>=5")
    cfg = load_config(dict(protocol='sample_ct_seg', arch='micro', img_size=(16, 64, 64), spacing=(3.0, 3.0, 2.5),
                                 device='cpu', progress=False))
    cases = [c for c in get_splits(cfg)['train'] if c['name'].startswith(('slab2', 'slab3'))]
    x = torch.stack([torch.as_tensor(c['image'][:, 3:19, 28:92, 28:92]) for c in cases]).float()
    y = torch.stack([torch.as_tensor(c['label'][:, 3:19, 28:92, 28:92]) for c in cases]).float()
    torch.manual_seed(0)
    ds = variant != 'nods'
    model = build_model('segmentation', 3, 8, 'micro', (16, 64, 64), deep_supervision=ds, drop_path_rate=0.)
    if variant == 'ce':
        ce = torch.nn.CrossEntropyLoss()
        loss_fn = lambda o, t: ce(o[0], t[:, 0].long())
    else:
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        if ds: loss_fn = DeepSupervisionLoss(loss_fn, weights=deep_supervision_weights(5))
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=3e-5)
    classes, t0 = PROTOCOLS['sample_ct_seg'].classes[1:], time.time()
    for i in range(n):
        model.train()
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 12); opt.step()
        if (i + 1) % (n // 5) == 0:
            model.eval()
            with torch.no_grad(): p = model(x)
            dice = np.nanmean([segmentation_scores(p[k:k + 1], y[k:k + 1])[0]['dice'] for k in range(2)], 0)
            print(f"{variant} lr {lr} iter {i + 1}: loss {loss.item():.3f}, Dice {dict(zip(classes, np.round(dice, 2).tolist()))}, "
                  f"mean {np.nanmean(dice):.3f}, {time.time() - t0:.0f} s", flush=True)


if __name__ == '__main__':
    if len(sys.argv) != 4: raise SystemExit("usage: overfit_seg3d_fixed_batch.py ds|nods|ce LR N")
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
