"""Evidence that each method behaves as its paper says, measured through the package's public API.

One module per paper, each holding its experiments as functions that take a seed and size knobs and
return plain numbers and arrays (tests run them small, the report at full size):

* :mod:`autolr_fused.validation.autodrop`: AutoDrop, autodrop.txt Section 3 (Theorem 1 on the noisy
  quadratic model, Figures 1-3);
* :mod:`autolr_fused.validation.tlr`: Trainable Learning Rate, trainable_learning_rate.txt Section 5;
* :mod:`autolr_fused.validation.rdbd`: Regrettable Delta-Bar-Delta, rdbd.txt Section 5;
* :mod:`autolr_fused.validation.aalr`: AALR, aalr.txt Algorithm 1 and Section 4;
* :mod:`autolr_fused.validation.sgdl`: vanilla SGD with a large lr, sgdl_vanilla_sgd_large_lr.txt Section 6.

``python -m autolr_fused.validation --out docs`` reruns everything at full size and writes
``docs/validation.md`` with the figures under ``docs/validation/`` (:mod:`autolr_fused.validation.report`).
The data set is scikit-learn's bundled 8x8 digits (nothing is downloaded); scikit-learn and matplotlib
come with the ``demo`` extra.
"""
