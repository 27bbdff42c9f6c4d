"""Where a compiled :class:`~nngraft.compile.plan.GraftPlan` runs.

- :mod:`nngraft.backends.base`: the :class:`Backend` interface (forward a plan on a padded batch).
- :mod:`nngraft.backends.local`: one nnsight trace of the recipient in this process.
- :mod:`nngraft.backends.ndif`: requests to NDIF (or a stand-in server), donor sent as tensors.
- :mod:`nngraft.backends.payload` builds what a request carries; :mod:`nngraft.backends.functional`
  is the code that runs on the server.
"""
