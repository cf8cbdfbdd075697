"""Segmentation models: built-in indices that need no weights, and loaders for model files."""
