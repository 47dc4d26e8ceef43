"""Synthetic CT phantoms: the generator and the writers of the public cohorts' file layouts.

Modules:
  portable_math  elementary functions with the same bits on every x86-64 CPU (the generator's exp, log,
                 sin, cos, normal quantile and Gaussian kernel)
"""
