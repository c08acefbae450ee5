"""`lens-jax parity`: layer-by-layer comparison of lens-jax with the PyTorch references."""
