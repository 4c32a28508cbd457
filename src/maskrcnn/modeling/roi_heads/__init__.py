"""RoI heads: the box branch, the mask branch, and the heads that run them (FPN and C4)."""
