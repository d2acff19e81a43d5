"""The ``fedunroll`` command line: the jobs a user runs (synth, prepare, train, recon, personalize,
simulate with its process supervision, report, config).

The product's packages sit beside it: ``recon`` (the PyTorch + SigPy core), ``strategies`` (the
message protocol and the aggregation maths), ``server`` (the ServerApp) and ``client`` (the
ClientApp). Only this package imports ``server``; see README "Architecture".
"""
