"""The paper's study, built on the grafting core: datasets, finetuning, metrics, sweeps, plots,
localization, the hybrid experiment, the demo, its model SmolLM2 (:mod:`nngraft.study.smollm2`: importing the study
registers the name ``smollm2`` with the core's model resolver) and what a run records about
its models and machine (:mod:`nngraft.study.provenance`). Its ``*_commands`` modules register the study's CLI verbs.

Layering: ``nngraft.study`` uses ``nngraft`` (spec, Grafter); the core never imports the study
(``tests/test_layering.py`` checks it).
"""

from . import smollm2  # noqa: F401,E402  (registers the model name 'smollm2')
