"""Small helpers below everything else; each imports only :mod:`nngraft.errors`.

- :mod:`nngraft.util.io` — reading user files (UTF-8, JSON) with one clear error each; atomic writes,
  refusing to overwrite files nngraft did not write;
- :mod:`nngraft.util.checks` — argument checks that raise :class:`~nngraft.errors.ArgumentError`;
- :mod:`nngraft.util.hub` — the Hugging Face Hub's refusals (a gated repository) as one clear error;
- :mod:`nngraft.util.progress` — live bars on a terminal, plain lines in logs and notebooks without ipywidgets;
- :mod:`nngraft.util.html` — the small HTML tables results show in Jupyter.

Example:
    >>> from nngraft.util.checks import positive_int_arg
    >>> positive_int_arg("3")
    3
"""
