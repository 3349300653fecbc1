"""Three-stage training of the descriptor model (``retrieval train``): augmentations, the stages,
data-parallel runs through TorchDistributor, model cards, held-out evaluation, and the compact
default-model asset. See docs/training.md."""
