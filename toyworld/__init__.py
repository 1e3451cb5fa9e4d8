"""A toy world with known content (shape) and style (rendering) factors, its judges and a mini-SDXL trained on it."""
