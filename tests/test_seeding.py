"""Derived seeds: in torch's range for any integers, deterministic, distinct for distinct parts."""

import os
import subprocess
import sys

import torch

from maskrcnn._seeding import derive_seed


def test_derived_seeds_are_in_range_deterministic_and_distinct():
    parts = [(0,), (1,), (0, 0), (0, 1), (1, 0), (2**64 - 1, 10**6, 15), (-(2**63), 3), (10**40, 7)]
    seeds = [derive_seed(*p) for p in parts]
    assert seeds == [derive_seed(*p) for p in parts]
    assert len(set(seeds)) == len(seeds)
    for s in seeds:
        assert 0 <= s < 2**63
        torch.Generator().manual_seed(s)  # accepted
    # the same in another interpreter with another string-hash salt (runs resume in new processes)
    code = f"from maskrcnn._seeding import derive_seed; print([derive_seed(*p) for p in {parts!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert out.strip() == str(seeds)
