"""`refit --project NAME` (and REFIT_PROJECT) on every command, against a real folder store: the project's
versions are its own BentoML model line, and the default project is untouched."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, jpeg_bytes, make_dataset, run_cli


def test_every_command_works_on_the_chosen_project(tmp_path):
    home = tmp_path / "home"
    data = make_dataset(tmp_path / "colours", n=8)
    made = run_cli("project", "create", "acme", home=home)
    assert made.returncode == 0 and "acme." in made.stdout, made.stderr
    unknown = run_cli("--project", "nosuch", "versions", home=home)
    assert unknown.returncode == 2 and "unknown project 'nosuch'" in unknown.stderr
    bad = run_cli("--project", "No_Such", "versions", home=home)
    assert bad.returncode == 2 and "[a-z0-9][a-z0-9-]{0,62}" in bad.stderr
    trained = run_cli("--project", "acme", "train", data, "--strategy", "feature_extraction", "--epochs", "2",
                      "--json", home=home)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads(trained.stdout.splitlines()[-1])["version"] == "v0001"
    versions = json.loads(run_cli("--project", "acme", "versions", "--json", home=home).stdout)
    assert [v["version"] for v in versions] == ["v0001"] and versions[0]["tag"] == "refit-acme:v0001"
    assert json.loads(run_cli("versions", "--json", home=home).stdout) == []  # default: nothing of acme's
    image = tmp_path / "red.jpg"
    image.write_bytes(jpeg_bytes("red", seed=99))
    env = {**os.environ, "REFIT_HOME": str(home), "BENTOML_HOME": str(home), "REFIT_PROJECT": "acme"}
    pred = subprocess.run([sys.executable, "-m", "cli", "predict", str(image), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)[0]["top_k"][0]["label"] == "red"
    explained = run_cli("--project", "acme", "explain", image, "--json", home=home)
    assert explained.returncode == 0 and json.loads(explained.stdout)["label"] == "red", explained.stderr
    added = run_cli("--project", "acme", "dataset", "add", "shapes", data, "--json", home=home)
    assert added.returncode == 0, added.stderr
    assert [d["dataset"] for d in json.loads(run_cli("--project", "acme", "dataset", "list", "--json",
                                                     home=home).stdout)] == ["shapes"]
    assert json.loads(run_cli("dataset", "list", "--json", home=home).stdout) == []
    assert run_cli("--project", "acme", "promote", "v0001", home=home).returncode == 0
    rolled = run_cli("--project", "acme", "rollback", home=home)
    assert rolled.returncode == 2 and "nothing to roll back" in rolled.stderr
    listing = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"], cwd=ROOT,
                             env={**os.environ, "BENTOML_HOME": str(home)}, capture_output=True, text=True,
                             timeout=120)
    assert "refit-acme:v0001" in listing.stdout, listing.stdout + listing.stderr
    assert json.loads(run_cli("project", "list", "--json", home=home).stdout) == ["default", "acme"]
