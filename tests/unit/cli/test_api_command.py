"""`lorafleet api` and `lorafleet api keys create` at the command line (no Ray started)."""

from __future__ import annotations

import importlib.util

from click.testing import CliRunner

from lorafleet.cli import api as api_cli
from lorafleet.cli.main import cli
from lorafleet.service.auth import authenticate
from lorafleet.service.db import Database


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(tmp_path):
    db = f"sqlite:///{tmp_path}/api.db"
    result = CliRunner().invoke(cli, ["api", "keys", "create", "--tenant", "team-a", "--max-concurrent", "3",
                                      "--db", db])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    database = Database(db)
    assert authenticate(database, key).tenant == "team-a"
    assert database.row("SELECT max_concurrent FROM tenants WHERE name = 'team-a'")["max_concurrent"] == 3
    assert key not in (tmp_path / "api.db").read_bytes().decode("latin-1")


def test_keys_create_refuses_a_bad_tenant(tmp_path):
    result = CliRunner().invoke(cli, ["api", "keys", "create", "--tenant", "a b/c", "--db", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 2 and "--tenant" in result.output


def test_api_without_the_extra_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(api_cli.importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = CliRunner().invoke(cli, ["api"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install 'lorafleet[api]'" in lines[0]


def test_api_refuses_a_bad_models_file(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  tiny:\n    spec:\n      lora: {r: -1}\n")
    result = CliRunner().invoke(cli, ["api", "--models", str(models), "--db", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 2
    assert "models.tiny.spec." in result.output and "lora.r" in result.output
