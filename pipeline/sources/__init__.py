"""Inputs: open a source, read a region, say which pixels are valid."""
