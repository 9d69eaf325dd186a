"""Transfer Studio's engine: data, backbones, transfer models, training, evaluation and export.

Importing the package is cheap; heavy modules load on first use.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `tl_core.load_bundle(path)` without importing torch when the package is imported.
    if name == "load_bundle":
        from .export import load_bundle

        return load_bundle
    raise AttributeError(f"module 'tl_core' has no attribute {name!r}")
