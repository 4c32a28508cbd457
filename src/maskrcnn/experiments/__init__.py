"""Experiments that train several models and compare them: the paper's ablations (``maskrcnn ablate``)."""
