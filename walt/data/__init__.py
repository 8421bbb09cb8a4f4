"""Data: the procedural world, readers for real formats, and the dataset protocol."""
