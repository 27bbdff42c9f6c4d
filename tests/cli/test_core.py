"""The core CLI commands, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

from nngraft import spec_json_schema


def nngraft(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nngraft.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_schema_prints_json_schema():
    run = nngraft("schema")
    assert run.returncode == 0
    assert json.loads(run.stdout) == spec_json_schema()


def test_validate_good_and_bad_specs(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"name": "lt", "rules": [{"components": ["mlp"], "layers": "last:2", "positions": [{"last": true}]}]}')
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "rules": [{"components": ["mlp"], "layers": "fifth_quarter", "positions": [{"last": true}]}]}')
    run = nngraft("validate", str(good))
    assert run.returncode == 0 and "'lt', 1 rule(s)" in run.stdout
    run = nngraft("validate", str(good), str(bad))
    assert run.returncode == 2
    assert "rules[0].layers" in run.stderr and "fifth_quarter" in run.stderr
    gates = tmp_path / "gates.json"
    gates.write_text('{"rules": [{"components": ["gate"], "positions": [{"last": true}]}]}')
    assert nngraft("validate", str(gates), "--model-type", "llama").returncode == 0
    run = nngraft("validate", str(gates), "--model-type", "gpt2")
    assert run.returncode == 2 and "component 'gate' does not exist in 'gpt2'" in run.stderr
    run = nngraft("validate", str(good), "--model-type", "gpt2", "--layers", "1")
    assert run.returncode == 2 and "last:2" in run.stderr


def test_usage_error_exit_code():
    assert nngraft("no-such-command").returncode == 2
