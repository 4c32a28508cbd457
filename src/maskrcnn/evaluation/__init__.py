"""COCO evaluation (pycocotools)."""
