"""Transfer Studio's engine: data, backbones, transfer models, training, evaluation and export.

Importing the package is cheap; heavy modules load on first use.
"""

__version__ = "0.1.0"
