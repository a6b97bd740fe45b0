"""Triton kernels for the beta-scaled adapter add (installed as ``ist_optim.kernels``).

Not yet implemented: the probe passes use the pure-torch path in
``ist_optim.suppression`` on every device. Importing this package never
imports Triton.
"""
