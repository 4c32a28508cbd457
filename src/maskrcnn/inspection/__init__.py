"""``maskrcnn inspect``: looking at a dataset and at how the model's anchors fit it, before training."""
