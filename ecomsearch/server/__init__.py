"""Running the real tritonserver locally (from the nvidia-pytriton wheel)."""
