"""The test tree itself: pytest imports test files by their base name (tests/ has no packages, so
`from helpers import ...` and `from test_smollm2_rtuning import sources` work), and two files
of one name in unit/ and integration/ make the second fail to collect."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_files_share_a_name():
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
