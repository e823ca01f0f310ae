"""Flower app for fedmq's round benchmark (runs in the bench venv, with flwr installed)."""
