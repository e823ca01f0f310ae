"""Run inside the dafne-dl environment: dafne-dl imports, and it is the release asked for.

Usage: python check_import.py VERSION
"""

import sys

import dafne_dl

expected = sys.argv[1]
normalised = dafne_dl.__version__.replace("-alpha", "a").replace("-beta", "b").replace("-", "")
if normalised != expected:
    sys.exit(f"expected dafne-dl {expected}, imported {dafne_dl.__version__} from {dafne_dl.__file__}")
print(f"dafne-dl {dafne_dl.__version__} from {dafne_dl.__file__}")
