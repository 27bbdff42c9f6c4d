"""The paper's study, built on the grafting core: datasets, finetuning, metrics, sweeps, plots.

Layering: ``nngraft.study`` uses ``nngraft`` (spec, Grafter); the core never imports the study.
"""
