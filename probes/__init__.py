"""Readouts on frozen features, the task registry, metrics and probe fitting.

Depends on torch and numpy only (and on the feature-file format, through in-memory arrays); never
on walt.models.
"""
