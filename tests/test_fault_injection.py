"""scripts/fault_injection.py --quick: real SIGKILLs, corrupted checkpoints, a full tmpfs and user
files against real training processes (about 3 minutes on 2 cores, hence slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


def unmet_targets(result: dict) -> list[str]:
    """Every target of the fault-injection result that is not met, described."""
    unmet = []
    kills, corruptions = result["kills"], result["corruptions"]
    if not kills["delivered"] == kills["planned"] == kills["survived"]:
        unmet.append(f"kills: {kills['survived']} of {kills['planned']} survived ({kills['delivered']} delivered)")
    unmet += [f"{run['run_id']}: a restart did not resume from the newest valid checkpoint"
              for run in kills["runs"] if not run["restarts_resumed_newest"]]
    unmet += [f"{run['run_id']}: losses differ from the uninterrupted run (rc {run['rc']})"
              for run in kills["runs"] if not run["losses_equal"]]
    if kills["inside_saves"] < 1:
        unmet.append("no kill landed inside a save")
    unmet += [f"corruption not detected or not fallen back from: {r['damage']} ({r})"
              for r in corruptions["records"] if not r["detected"]]
    disk = result["disk_full"]
    if disk["skipped"] and "cannot mount a tmpfs" not in disk["message"]:
        unmet.append(f"disk full skipped for another reason: {disk['message']}")
    for phase, case in disk["cases"].items():
        if not (case["rc"] != 0 and not case["traceback"] and case["names_path"] and case["says_no_space_left"]):
            unmet.append(f"disk full in the {phase}: not one line naming the path and 'no space left': "
                         f"rc {case['rc']}, {case['error_line']!r}")
        if case["partial_folders_left"] or not case["newest_checkpoint"] or case["newest_problems"]:
            unmet.append(f"disk full in the {phase}: partial folders {case['partial_folders_left']}, newest "
                         f"checkpoint {case['newest_checkpoint']}, problems {case['newest_problems']}")
        if not case["resumed_ok"]:
            unmet.append(f"disk full in the {phase}: the resumed run did not finish with the reference losses")
    users = result["user_files"]
    if users["touched"] or not users["files"]:
        unmet.append(f"user files: {users['touched']} of {users['files']} touched")
    unmet += [f"user files, {r['command']}: rc {r['rc']}, no refusal message"
              for r in users["records"] if r["rc"] == 0 or not r["refusal"]]
    return unmet


@pytest.mark.slow
def test_fault_injection_quick_meets_every_target(tmp_path):
    out = tmp_path / "fault_injection.json"
    done = subprocess.run([sys.executable, "scripts/fault_injection.py", "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kills"]["planned"] == 4 and result["corruptions"]["planned"] == 4
    assert {r["kind"] for r in result["corruptions"]["records"]} == {
        "bit flip", "truncation", "deleted file", "garbage COMPLETE"}
    unmet = unmet_targets(result)
    assert not unmet, "\n".join(unmet)
    assert result["all_met"] and done.returncode == 0
