"""bench/report_eval.py on two tiny phantom cases, template path only (no model): JSON structure, every planted
finding stated, nothing unsupported, and both checkers still reject a side-swapped sentence."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

from support.bench_scripts import load_bench_script

@pytest.fixture(scope="module")
def evaluation() -> tuple[ModuleType, dict]:
    module = load_bench_script("report_eval")
    cases = [module.Case("normal", 401),
             module.Case("emphysema_right+steatosis", 402, ("right",), 0.2, steatosis=True)]
    return module, module.run(True, backends=("template",), cases=cases)


def test_json_structure(evaluation: tuple[ModuleType, dict]) -> None:
    module, results = evaluation
    results = json.loads(json.dumps(results, default=str))
    assert set(results["paths"]) == {"template"} and len(results["cases"]) == 2
    summary = results["paths"]["template"]["summary"]
    for key in ("planted_stated_share", "normal_share", "unassessed_claimed_or_denied", "before_verification",
                "after_verification", "bleu_full_mean", "rouge_l_full_mean", "seconds_mean", "seconds_max"):
        assert key in summary, key
    for row in results["paths"]["template"]["per_case"]:
        assert row["released"]["impression"] and row["reference"]["impression"]
        assert {"verifier", "truth", "sentence"} <= set(row["after_verification"][0])
    assert "favour the template" in results["reference_note"]
    assert "template" in module.table(results)


def test_template_states_every_planted_finding_and_nothing_unsupported(evaluation: tuple[ModuleType, dict]) -> None:
    _, results = evaluation
    summary = results["paths"]["template"]["summary"]
    assert summary["planted_findings"] == 1 and summary["planted_stated_in_impression"] == 1
    assert summary["normal_cases"] == 1 and summary["normal_not_called_abnormal"] == 1
    assert summary["unassessed_plant_cases"] == 1 and summary["unassessed_claimed_or_denied"] == 0
    for stage in ("before_verification", "after_verification"):
        counts = summary[stage]
        assert counts["sentences"] > 10
        assert counts["unsupported_verifier"] == 0 and counts["unsupported_truth"] == 0, stage
        assert counts["vacuous_truth"] == 0, stage
    steatosis = results["paths"]["template"]["per_case"][1]
    assert steatosis["limitations_say_not_assessed"]["hepatic steatosis"]
    assert steatosis["planted_stated"] == {"right": True}
    assert summary["bleu_full_mean"] == pytest.approx(100.0) and summary["rouge_l_full_mean"] == pytest.approx(1.0)


def test_both_checkers_reject_wrong_sides_numbers_and_unassessed_claims(evaluation: tuple[ModuleType, dict]) -> None:
    module, results = evaluation
    case = module.Case("emphysema_right+steatosis", 402, ("right",), 0.2, steatosis=True)
    measured = results["cases"][1]["measured"]
    truth = module.Truth(case, measured, {"lung_left": [(5.0, "%")], "lung_right": [(5.0, "%")]})
    laa_right = measured["lung_right"]["LAA-950"][0]
    assert module.truth_check(f"Emphysema of the right lung (LAA-950 {laa_right:g} %).", truth) is None
    for sentence in (f"Emphysema of the left lung (LAA-950 {laa_right:g} %).",
                     f"Emphysema of the right lung (LAA-950 {laa_right + 2:g} %).",
                     "No emphysema.", "Hepatic steatosis.", "No hepatic steatosis.", "A 4 mm nodule.",
                     "The lungs are normal."):
        assert module.truth_check(sentence, truth) not in (None, "vacuous"), sentence
    assert module.truth_check("The patient was cooperative.", truth) == "vacuous"
