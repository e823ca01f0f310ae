"""Code shared by the fedmq coordinator and workers.

Importing this package (and its weight arithmetic, codec and signing modules) never imports
TensorFlow: the coordinator aggregates with numpy alone. TensorFlow loads lazily, inside the
model functions that build a Keras model.
"""

__version__ = "0.1.0"
