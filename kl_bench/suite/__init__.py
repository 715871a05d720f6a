"""The suite that measures KL implementations: the library (``kl_bench``) never imports it.

- ``cases``: named, seeded regimes -> parameter sets;  ``reference``: certified references
  (exact rationals, ball arithmetic) and their on-disk cache;  ``metrics``: ulps, relative error, bits;  ``bounds``: the accuracy
  this project promises.
- ``subjects``: what is measured (this project's kernels per backend and mode, third parties).
- ``accuracy``, ``gradients``, ``timing``: the three sweeps (``accuracy_sweep``,
  ``gradient_sweep``, ``timing_sweep``), each a tidy pandas DataFrame;  ``tables``: pivots,
  Markdown, files.
- ``runner`` (``kl-bench run`` in resumable cells), ``report``, ``recommend``, ``baseline``,
  ``checker`` (``kl_bench.check``), ``export`` (``kl-bench export-cases``).
"""
