"""Datasets (COCO format, the built-in synthetic shapes) and the training data pipeline."""
