"""Shared SR cases of tests/results (test_sr_content, test_ohif_parse, test_dsr2html).

`pe_case` / `no_pe_case`: (series, windows, prediction, ResultSet) of a PE-positive phantom whose two
hottest windows are called positive, and of a PE-negative phantom, with hand-made predictions
(`test_results.hand_made_prediction`); built by `sr_cases`.
"""

from __future__ import annotations

from typing import Any

import pytest
from sr_cases import negative_case, positive_case


@pytest.fixture(scope="module")
def pe_case() -> tuple[Any, Any, Any, Any]:
    return positive_case()


@pytest.fixture(scope="module")
def no_pe_case() -> tuple[Any, Any, Any, Any]:
    return negative_case()
