"""taming-deploy: run Taming Transformers models from exported bundles (no torch needed here)."""

__version__ = "0.1.0"
