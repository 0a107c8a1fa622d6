"""The training side: datasets, reference models, checkpoints and the Trainer (imports torch)."""
