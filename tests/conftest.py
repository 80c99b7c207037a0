"""Fixtures shared by several test modules."""

from tests.fault_fixtures import chain  # noqa: F401 - session-scoped: test_faults.py and test_bad_inputs.py
