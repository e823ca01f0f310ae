"""Interop tests: fedmq's model format against the PyPI package dafne-dl, run in its own virtualenv."""
