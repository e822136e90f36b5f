"""Helpers shared by the tests."""
from __future__ import annotations

import pytest


def mark_slow(cases: list, *ids: str) -> list:
    """The cases of a parametrized test, those with one of ``ids`` (a plain value, or a
    ``pytest.param``'s id) marked ``slow``: the quick subset keeps the rest of the family, the full
    suite runs them all. A name that matches no case is an error, so a rename cannot drop it."""
    def case_id(case) -> str:
        return case.id if hasattr(case, "values") else str(case)

    missing = set(ids) - {case_id(c) for c in cases}
    assert not missing, f"mark_slow: no case {sorted(missing)}"
    return [case if case_id(case) not in ids else
            pytest.param(*case.values, marks=[*case.marks, pytest.mark.slow], id=case.id) if hasattr(case, "values")
            else pytest.param(case, marks=pytest.mark.slow, id=str(case)) for case in cases]
