"""Training, evaluation loops, checkpoints and the predictor."""
