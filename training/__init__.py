"""The EDM2 method: network, loss, EMA, datasets, encoders and the training loop."""
