"""Every recorded run (tests/golden.py) still prunes to the same weights and reports the same.

A refactor must leave these unchanged; re-record (``python tests/golden.py --record``) only for a
deliberate change of behaviour, and say so in the commit. ``MOREAU_GOLDEN_EXACT=1`` also compares
floats and float tensors bit for bit (valid on the machine that recorded them).
"""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden  # noqa: E402

RECORDED = json.loads(golden.GOLDEN.read_text())
EXACT = os.environ.get("MOREAU_GOLDEN_EXACT") == "1"


def test_every_case_is_recorded():
    assert sorted(RECORDED) == sorted(golden.cases())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.mark.parametrize("name", sorted(golden.cases()))
def test_golden(name, root):
    got = golden.run_case(name, root)
    problems = golden.check(name, RECORDED[name], got, EXACT)
    assert not problems, f"{name} changed:\n" + "\n".join(problems[:20])


def test_compare_sees_a_change():
    want = {"a": [1, 2.0, {"b": "x"}], "c": 1.0}
    assert golden.compare(want, want, exact=True) == []
    assert golden.compare(want, {"a": [1, 2.0, {"b": "y"}], "c": 1.0}, exact=False)
    assert golden.compare(want, {"a": [1, 2.001, {"b": "x"}], "c": 1.0}, exact=False)
    assert golden.compare(want, {"a": [1, 2.0 + 1e-9, {"b": "x"}], "c": 1.0}, exact=False) == []
    assert golden.compare(want, {"a": [1, 2.0 + 1e-9, {"b": "x"}], "c": 1.0}, exact=True)
    assert golden.compare(want, {"a": [1, 2.0], "c": 1.0}, exact=False)
