"""Benchmarks (not tests): ``make bench`` (quick) or ``make bench-full``. See bench/README.md."""
