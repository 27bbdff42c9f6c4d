"""The compiler: a spec and prompts become an exact per-module, per-position plan.

- :mod:`nngraft.compile.tokens` — tokenize prompts, find each span's tokens, pad a batch;
- :mod:`nngraft.compile.plan` — :func:`~nngraft.compile.plan.compile_plan`: spec × model × batch →
  :class:`~nngraft.compile.plan.GraftPlan` (which module is grafted at which token positions);
- :mod:`nngraft.compile.schedule` — the plan as a forward-ordered schedule of module grafts;
- :mod:`nngraft.compile.trace` — a plan bound to its inputs (:class:`~nngraft.compile.trace.CompiledGraft`)
  and :func:`~nngraft.compile.trace.graft`, which applies it inside a trace you opened yourself.

Example:
    >>> from nngraft.compile.plan import compile_plan  # what Grafter.compile calls
"""
