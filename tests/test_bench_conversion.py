"""bench/conversion.py's marginal rate: the difference of two input depths, row by row (fixed costs cancel)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.megatron_helpers import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_conversion", REPO / "bench" / "conversion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(label, gb, dd, seconds, startup, dd_write=0.5):
    # (label, bytes read, dd read s, command s, peak RSS GiB, bytes written, dd write s, start-up s)
    return (label, gb * 1e9, dd, seconds, 1.0, gb * 1e9, dd_write, startup)


def test_marginal_rate_cancels_start_up(bench, capsys):
    small = [row("graft", 4.0, 2.0, 8.0, 4.0), row("merge ties", 2.0, 1.0, 10.0, 3.0)]
    large = [row("graft", 12.0, 6.0, 16.0, 4.0, dd_write=1.5), row("merge ties", 6.0, 4.0, 8.0, 3.0),
             row("import", 2.0, 1.0, 9.0, 4.0)]
    assert bench.marginal_rows(small, large) == [("graft", 8.0, 4.0, 1.0, 8.0), ("merge ties", 4.0, 3.0, 0.0, -2.0)]
    graft_rate = bench.print_marginal(small, large)
    assert graft_rate == pytest.approx(1e9)  # 8 GB more in 8 s more, whatever the 4 s of start-up
    lines = capsys.readouterr().out.splitlines()
    assert "| graft | 8.00 | 4.0 (2.00) | 1.0 | 8.0 | 1.00 | 50 % | 62 % |" in lines
    assert "| merge ties | 4.00 | 3.0 | 0.0 | -2.0 | n/a | n/a | n/a |" in lines  # faster when larger: no rate
    assert not any(line.startswith("| import") for line in lines)  # only in one table
