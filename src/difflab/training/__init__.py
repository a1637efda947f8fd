"""Training: one loop for every method (trainer), what is trained (methods, classification), atomic
safetensors checkpoints, the EMA of the weights, and PyTorch's distributed engine."""
