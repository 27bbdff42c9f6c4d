"""Templates read from the user's files (``--templates FILE``, a sweep config's template paths):
training templates by family, test templates by name, as ``.json``, ``.jsonl`` or plain text.
"""

from __future__ import annotations

from typing import Any

from .errors import TemplateError
from .templates import resolve_test_template, template_fields, unknown_test_template


def _template_lines(path: Any) -> Any:
    """``(path, parsed JSON or None, non-blank lines)`` of a template file, or a clear error."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"no template file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return path, json.loads(text), []
        except ValueError as error:
            raise TemplateError(f"{path} is not valid JSON: {error}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise TemplateError(f"{path}, line {i}: not valid JSON ({error.msg})") from None
        return path, rows, []
    return path, None, lines


def read_training_templates(path: Any) -> dict[str, list[str]]:
    """Your own training templates from a file, as ``{family: [template, ...]}``:

    - ``.json``: ``{"family": ["template", ...], ...}`` or a plain list (family ``"custom"``);
    - ``.jsonl``: one ``{"template": ..., "family": ...}`` (family optional) or string per line;
    - any other file: one template per line (family ``"custom"``).

    Every template is checked for well-formed ``{fields}``; the facts' fields are checked when
    the texts are rendered (:func:`training_texts`).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "mine.txt"
        >>> _ = p.write_text("{inventor} built {device}.\\nThe {device} is the work of {inventor}.\\n")
        >>> read_training_templates(p)
        {'custom': ['{inventor} built {device}.', 'The {device} is the work of {inventor}.']}
    """
    path, parsed, lines = _template_lines(path)
    table: dict[str, list[str]] = {}
    if parsed is None:
        table["custom"] = lines
    elif isinstance(parsed, dict):
        for family, temps in parsed.items():
            if isinstance(temps, str):
                temps = [temps]
            if not isinstance(temps, list) or not all(isinstance(t, str) for t in temps):
                raise TemplateError(f"{path}: family {family!r} must be a list of template strings")
            table[str(family)] = list(temps)
    elif isinstance(parsed, list):
        for i, row in enumerate(parsed, 1):
            if isinstance(row, str):
                table.setdefault("custom", []).append(row)
            elif isinstance(row, dict) and isinstance(row.get("template"), str):
                table.setdefault(str(row.get("family", "custom")), []).append(row["template"])
            else:
                raise TemplateError(f"{path}, entry {i}: expected a template string or "
                                    "{\"template\": ..., \"family\": ...}")
    else:
        raise TemplateError(f"{path}: expected {{family: [templates]}} or a list of templates")
    table = {f: t for f, t in table.items() if t}
    if not table:
        raise TemplateError(f"{path} holds no templates")
    for temps in table.values():
        for t in temps:
            if not template_fields(t):
                raise TemplateError(f"{path}: template {t!r} names no {{field}}; a training template "
                                    "is filled from each fact's fields")
    return table


def read_test_templates(path: Any) -> list[tuple[str, str]]:
    """Your own test templates from a file, as ``[(name, template), ...]``:

    - ``.json``: ``{"name": "template", ...}`` or a list of template strings;
    - ``.jsonl``: one ``{"name": ..., "template": ...}`` (name optional) or string per line;
    - any other file: one template per line.

    A template without a name is named by itself; a named template (``sentence_3``) may be listed
    by name.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "tests.json"
        >>> _ = p.write_text('{"built": "{inventor} built the"}')
        >>> read_test_templates(p)
        [('built', '{inventor} built the')]
    """
    from pathlib import Path

    if not Path(path).exists() and not Path(path).suffix and len(Path(path).parts) == 1:
        raise unknown_test_template(str(path), files=True)  # a misspelt name, not a missing file
    path, parsed, lines = _template_lines(path)
    pairs: list[tuple[str | None, str]] = []
    if parsed is None:
        pairs = [(None, line.strip()) for line in lines]
    elif isinstance(parsed, dict):
        pairs = [(str(k), v) for k, v in parsed.items()]
    elif isinstance(parsed, list):
        for row in parsed:
            if isinstance(row, dict):
                pairs.append((row.get("name"), row.get("template")))
            else:
                pairs.append((None, row))
    else:
        raise TemplateError(f"{path}: expected {{name: template}} or a list of templates")
    out: list[tuple[str, str]] = []
    for name, template in pairs:
        if not isinstance(template, str):
            raise TemplateError(f"{path}: template {name or len(out) + 1!r} is not a string: {template!r}")
        key, text = resolve_test_template(template)
        out.append((str(name) if name else key, text))
    if not out:
        raise TemplateError(f"{path} holds no templates")
    return out
