"""The paper's study, built on the grafting core: datasets, finetuning, metrics, sweeps, plots,
localization, the hybrid experiment, the demo, and model loading / the SmolLM2 GGUF conversion
(:mod:`nngraft.study.models`). Its ``*_commands`` modules register the study's CLI verbs.

Layering: ``nngraft.study`` uses ``nngraft`` (spec, Grafter); the core never imports the study
(``tests/test_layering.py`` checks it).
"""
