"""Model building blocks: backbones, FPN, RPN, RoI heads and the detector that joins them."""
