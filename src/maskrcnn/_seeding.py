"""Seeds derived from other seeds, for any integers.

Training draws its shuffles, flips, resize choices and anchor/RoI samples from seeds derived from
``train.seed`` and the iteration. Arithmetic such as ``(seed * 1_000_003 + it) * 1024`` leaves the
64 bits ``torch.manual_seed`` accepts once the run seed passes a few million; a hash of the parts
takes any integers (any size, any sign) and gives a seed in range, the same on every machine.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` determined by ``parts`` (integers of any size)."""
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
