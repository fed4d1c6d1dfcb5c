"""UniMiSS: universal medical self-supervised learning across 2D X-rays and 3D CT, as readable notebooks and a tested package

Modules:

- `unimiss.evaluate`: Frozen-feature probes of any UniMiSS backbone (cosine k-NN and a linear probe, as the SSL field measures representations), the online probe of a pretraining run, and the CPU-sized protocol that shows whether pretraining learns."""

__version__ = "0.0.1"
