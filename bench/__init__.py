"""loaderd benchmarks: every figure is a ratio against a baseline measured in the same run.

Run from the repository root, as root: `/usr/bin/python3 -m bench` (or `bench/run.py`);
`--quick` for N=1,5 only. See bench/run.py for what each figure means.
"""
