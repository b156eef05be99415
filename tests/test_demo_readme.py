"""The README's demo section, docs/demo.png and docs/demo_results.json: every number and the
picture come from the committed result of a default run of the current code, and these tests fail
when any of them drifts (``python -m fastsam.demo.readme --check``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fastsam.demo import readme
from fastsam.demo.plot import PNG_KEY, png_text, save_plot
from fastsam.demo.variants import VARIANTS


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(readme.RESULTS.read_text())


def test_committed_demo_outputs_are_current() -> None:
    """If this fails: run `python -m fastsam.demo`, then
    `python -m fastsam.demo.readme --from fastsam_demo_out/results.json`, and commit
    docs/demo_results.json, docs/demo.png and README.md."""
    assert readme.check() == []


def test_committed_results_are_a_full_default_run(committed: dict) -> None:
    assert not committed["quick"] and committed["argv"] == []
    dig = committed["digits"]
    assert dig["select"] and dig["noise_rates"] == [0.0, 0.4] and dig["seeds"] == [0, 1, 2]
    assert sorted([v["name"] for v in dig["variants"]] + [s["name"] for s in dig["skipped"]]) == sorted(VARIANTS)
    assert len(committed["toy"]["seeds"]) == 12 and committed["env"]["commit"]


def test_the_readme_numbers_are_the_results(committed: dict) -> None:
    """Spot checks that the region shows these results (not only that it is what the renderer makes)."""
    text = readme.README.read_text()
    region = text[text.index(readme.BEGIN):text.index(readme.END)]
    sam = next(v for v in committed["digits"]["variants"] if v["name"] == "sam")
    noisy = sam["conditions"][1]
    assert f"{100 * noisy['acc_mean']:.1f} ± {100 * noisy['acc_std']:.1f}" in region
    assert f"| {sam['ms_per_step']:.1f} |" in region
    sgd = committed["toy"]["summary"][0]
    assert f"{100 * sgd['hard_sign_error_mean']:.1f} ± {100 * sgd['hard_sign_error_std']:.1f}" in region
    assert "![fastsam demo](docs/demo.png)" in region
    assert text.count(readme.BEGIN) == text.count(readme.END) == 1


def test_check_catches_each_kind_of_drift(committed: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    save_plot(committed, png, digest=readme.digest(committed))
    assert png_text(png)[PNG_KEY] == readme.digest(committed)
    good = readme.replace_region("intro\n" + readme.BEGIN + "\nold\n" + readme.END + "\noutro\n",
                                 readme.render_region(committed))
    assert good.startswith("intro\n") and good.endswith("\noutro\n")
    assert readme.stale_reasons(committed, good, png) == []

    # a hand-edited number in the README
    sam = next(v for v in committed["digits"]["variants"] if v["name"] == "sam")
    edited = good.replace(f"| {sam['ms_per_step']:.1f} |", f"| {sam['ms_per_step'] + 1:.1f} |", 1)
    assert edited != good
    assert any("README" in w for w in readme.stale_reasons(committed, edited, png))
    assert any("no <!-- demo:begin -->" in w for w in readme.stale_reasons(committed, "no markers", png))

    # new results without a new picture (and the README regenerated from them)
    other = copy.deepcopy(committed)
    other["digits"]["variants"][0]["conditions"][0]["acc_mean"] += 0.01
    fresh = readme.replace_region(good, readme.render_region(other))
    assert readme.stale_reasons(other, fresh, png) == ["docs/demo.png was not drawn from docs/demo_results.json"]

    # results of another configuration than the current defaults (a changed recipe or registry)
    other = copy.deepcopy(committed)
    other["spec"]["digits"]["epochs"] += 1
    fresh = readme.replace_region(good, readme.render_region(other))
    png2 = tmp_path / "demo2.png"
    save_plot(other, png2, digest=readme.digest(other))
    why = readme.stale_reasons(other, fresh, png2)
    assert len(why) == 1 and "not a run of the current defaults (differs in: digits)" in why[0]

    # a variant skipped in the results that the installed fastsam has now
    other = copy.deepcopy(committed)
    other["digits"]["skipped"].append({"name": "sam", "label": "SAM", "reason": "fastsam has no SAM yet"})
    fresh = readme.replace_region(good, readme.render_region(other))
    save_plot(other, png2, digest=readme.digest(other))
    why = readme.stale_reasons(other, fresh, png2)
    assert len(why) == 1 and "this fastsam has it now" in why[0]
