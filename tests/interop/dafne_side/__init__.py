"""Scripts run inside the dafne-dl environment (see ``tests/interop/dafne_env.py``).

Only ``keras_digits`` is also imported by the tests; the other modules are scripts.
"""
