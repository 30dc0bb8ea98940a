"""`scripts/make_model_card.py`'s partial updates replace only their own section of a
card (the rest, written from training runs that may be gone, must survive)."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "docs" / "results" / "gate_floor" / "suite_floor.json"


def _script():
    return load_script("make_model_card")


def _card(mc) -> str:
    return "\n".join([
        "# Model card", "", "## How it was trained", "- written by hand, runs gone", "",
        *mc.stage1_section({"full": {"aperture_corr": 0.5, "lip_lmd": 0.03}}, "at the end of training"),
        "## End to end (old)", "old table", "", "## Limits", "- few people", "",
        "## Head mode", *mc.HEAD_TABLE, mc.head_row({"aperture_corr": 0.4}), "",
        mc.HEAD_SUITE + " (old)", "```", "old head table", "```", "",
    ])


def test_suite_updates_replace_only_their_section(tmp_path):
    mc = _script()
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(_card(mc))
    mc.update_suite(tmp_path, SUITE)
    text = card.read_text()
    assert "old table" not in text and "tccp_tracked" in text and "## Limits\n- few people" in text
    assert "- written by hand, runs gone" in text and "| full context (files) | 0.500 |" in text
    assert "old head table" in text  # the head block is not the mouth suite's
    mc.update_head_suite(tmp_path, SUITE)
    text2 = card.read_text()
    assert "old head table" not in text2 and text2.count(mc.HEAD_SUITE) == 1
    assert text2.split(mc.HEAD_SUITE)[0] == text.split(mc.HEAD_SUITE)[0]  # everything before it kept
    assert "| 0.400 |" in text2  # the head stage-1 row untouched
