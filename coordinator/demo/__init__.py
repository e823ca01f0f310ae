"""The README's demo."""
