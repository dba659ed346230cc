"""The read-bandwidth probe that benchmarks divide decode GB/s by."""

import math

import pytest

import ffnskip_ext

MIB = 1 << 20


def test_probe_reads_at_a_plausible_rate() -> None:
    one = ffnskip_ext.measure_read_bandwidth(64 * MIB, num_threads=1, repeats=2)
    every = ffnskip_ext.measure_read_bandwidth(64 * MIB, num_threads=0, repeats=2)
    for rate in (one, every):  # any machine this runs on: between 100 MB/s and 10 TB/s
        assert math.isfinite(rate) and 1e8 < rate < 1e13


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bytes": 1 * MIB}, "64 MiB"),
        ({"bytes": 64 * MIB, "repeats": 0}, "repeats"),
        ({"bytes": 64 * MIB, "num_threads": -1}, "num_threads"),
    ],
)
def test_probe_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ffnskip_ext.measure_read_bandwidth(**kwargs)
