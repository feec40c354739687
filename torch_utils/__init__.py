"""PyTorch helpers: persistence of networks in pickles, distributed set-up, statistics, misc."""
