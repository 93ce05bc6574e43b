"""auto's decision: the trial that survives a worse first epoch, and the whole choice on real photos."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from training.choose import Trial, trend


def rows(*accs: float, loss: float = 0.9) -> list[dict]:
    return [{"epoch": i + 1, "val_acc": a, "val_loss": loss} for i, a in enumerate(accs)]


def test_trend_is_the_least_squares_line():
    assert trend([0.6, 0.65, 0.7], 5) == pytest.approx(0.8)
    assert trend([0.7, 0.6, 0.7], 5) == pytest.approx(0.6667, abs=1e-4)
    assert trend([0.5], 3) == 0.5


def test_a_worse_first_epoch_is_not_judged_alone():
    """Epoch 1 below the head (augmentation starts, the backbone's rate warms up) is never a reason to stop."""
    trial = Trial(head=(0.733, 0.82))
    assert trial(rows(0.70)) is None and trial(rows(0.70, 0.71)) is None
    # Still below the head after 3 epochs, but rising fast enough to reach it within 2 more: go on.
    assert trial(rows(0.66, 0.69, 0.72)) is None


def test_the_head_beaten_means_fine_tuning_goes_on():
    trial = Trial(head=(0.733, 0.82))
    assert trial(rows(0.70, 0.725, 0.75)) is None
    assert trial(rows(0.70, 0.74, 0.72, 0.71, 0.70, 0.70, 0.70)) is None  # beaten once: patience decides
    # The same accuracy as the head with a lower validation loss beats it (accuracy, then loss).
    assert trial(rows(0.70, 0.71, 0.733, loss=0.80)) is None


def test_flat_or_falling_fine_tuning_is_stopped_after_three_epochs():
    trial = Trial(head=(0.80, 0.6))
    why = trial(rows(0.60, 0.62, 0.61))
    assert why is not None and "3 epochs without beating the head's 0.8000" in why and "trend" in why


def test_never_beating_the_head_stops_at_the_last_look():
    trial = Trial(head=(0.80, 0.6))
    climbing = rows(0.70, 0.74, 0.78)  # trend reaches 0.86 by epoch 5: on to the last look
    assert trial(climbing) is None
    assert trial(rows(0.70, 0.74, 0.78, 0.79, 0.79)) is None
    assert "6 epochs without beating" in trial(rows(0.70, 0.74, 0.78, 0.79, 0.79, 0.795))


def _train(data, home, *args) -> tuple[dict, dict]:
    r = run_cli("train", data, "--json", "--no-int8", *args, home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out, r


def test_auto_keeps_partial_where_fine_tuning_pays(flowers_data, tmp_path):
    """flowers5_128px: the head reaches 0.733; partial is below it for its first epochs, then above it. The
    trial lets it get there, and the summary says by how much it won."""
    out, r = _train(flowers_data, tmp_path / "home", "--time-budget", "600")
    auto = out["auto"]
    assert out["strategy"] == "partial", auto["reason"]
    head, partial = auto["candidates"]["feature_extraction"], auto["candidates"]["partial"]
    assert partial["val_acc"] > head["val_acc"] and partial["best_epoch"] >= 2
    assert out["val_accuracy"] >= 0.74
    assert auto["summary"].startswith("kept partial: +") and "points over the head" in auto["summary"]
    assert f"strategy: {auto['summary']}" in r.stderr  # the line the data scientist reads


def test_auto_refuses_fine_tuning_within_the_budget_where_it_does_not_pay(real_data, tmp_path):
    """hymenoptera: the head reaches 0.96 and partial does not beat it; the trial stops partial within its
    six epochs, the head is kept, and the whole fit stays inside the budget."""
    out, _ = _train(real_data, tmp_path / "home", "--time-budget", "120")
    auto = out["auto"]
    assert out["strategy"] == "feature_extraction", auto["reason"]
    partial = auto["candidates"]["partial"]
    assert partial["stopped"] == "trial" and partial["epochs_run"] <= 6 and partial["trial"]
    assert auto["signals"]["fit_seconds"] <= 120
    assert auto["summary"].startswith("kept the head (") and "stopped by the trial" in auto["summary"]
    assert out["val_accuracy"] >= 0.94
