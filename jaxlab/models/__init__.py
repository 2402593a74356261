"""Models shared by the project's parts, in Flax NNX, loaded from Hugging Face checkpoints."""
