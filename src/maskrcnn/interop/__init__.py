"""Checkpoint converters for the model zoos people already have (torchvision; detectron2 later)."""
