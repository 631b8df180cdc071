"""Stage 1: the batch-normalized MLP in numpy, its trainer and its checkpoint file."""
