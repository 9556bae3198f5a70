"""docs/recipes.md is current, every paper preset loads and passes the config checks, and each
paper preset differs from its release preset in exactly the settings docs/recipes_refs.py says
the paper and the release disagree on (docs/make_recipes.py)."""
import importlib.util
import sys

import pytest

from conftest import REPO
from mplug_jax import config_checks


def _import(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make = _import("make_recipes")
refs = make.refs

PAIRS = [(sec, spec, paper_spec) for sec in make.SECTIONS for spec, role in sec.presets
         if role == "release" for paper_spec, prole in sec.presets if prole == "paper"]
PAIRS += [(next(s for s in make.SECTIONS if s.title == title), spec, paper_spec)
          for spec, paper_spec, title in make.EXTRA_PAIRS]
PRESETS = [(sec, spec, role) for sec in make.SECTIONS for spec, role in sec.presets]


def test_recipes_md_is_current():
    assert (REPO / "docs" / "recipes.md").read_text() == make.render(), \
        "docs/recipes.md is stale: run python docs/make_recipes.py"


@pytest.mark.parametrize("spec", sorted({p for _, _, p in PAIRS}))
def test_paper_preset_passes_the_config_checks(spec):
    config = make.load(spec)
    config_checks.check(config, training=True, files=False)
    assert config.variant.endswith("_paper")


@pytest.mark.parametrize("section,spec,paper_spec", PAIRS, ids=[p for _, _, p in PAIRS])
def test_paper_preset_differs_exactly_where_the_references_say(section, spec, paper_spec):
    release, paper = make.load(spec), make.load(paper_spec)
    expected = {row.field for row in section.rows if make.paper_differs(row)}
    assert expected, f"{section.title}: a paper preset that changes nothing"
    got = {row.field for row in section.rows if make.value(row, release) !=
           make.value(row, paper)}
    assert got == expected, (section.title, sorted(got), sorted(expected))
    for row in section.rows:  # where the paper states a value, the paper preset has it
        if make.ref_value(row.paper) is not None and not row.why_paper:
            assert make.value(row, paper) == make.ref_value(row.paper), (paper_spec, row.field)
    # Every changed config field belongs to one of those settings: nothing else moves.
    flat_r, flat_p = make.flatten(release), make.flatten(paper)
    changed = {k for k in flat_r.keys() | flat_p.keys()
               if k != "variant" and flat_r.get(k) != flat_p.get(k)}
    rows = [row for row in section.rows if row.field in expected]
    assert not {k for k in changed if not make.covered(k, rows)}, changed


@pytest.mark.parametrize("section,spec,role", PRESETS, ids=[p for _, p, _ in PRESETS])
def test_every_difference_from_the_followed_source_has_a_reason(section, spec, role):
    """A release preset that differs from the release, or a paper (or paper-only) preset that
    differs from the paper, says why in the references."""
    config = make.load(spec)
    for row in section.rows:
        ours = make.value(row, config)
        rel, pap = make.ref_value(row.release), make.ref_value(row.paper)
        if role == "release" and rel is not None and ours != rel:
            assert row.why, (spec, row.field, ours, rel)
        if role in ("paper", "ours") and pap is not None and ours != pap:
            assert row.why_paper, (spec, row.field, ours, pap)


def test_fmt_compares_numbers_by_value():
    assert make.fmt(3e-5) == make.fmt(0.00003) == "3e-5"
    assert make.fmt(8.0) == "8" and make.fmt(0.05) == "0.05" and make.fmt("") == "''"
    assert make.fmt(2e-5 * (5e-6 / 2e-5)) == "5e-6"


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch):
    monkeypatch.setattr(make, "OUT", tmp_path / "recipes.md")
    assert make.main(["--check"]) == 1
    assert make.main([]) == 0 and make.main(["--check"]) == 0
