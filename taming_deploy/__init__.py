"""taming-deploy: run Taming Transformers models from exported bundles (no torch needed here)."""

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    # Lazy, so that importing a submodule (errors, spec, ...) does not load the whole runtime.
    if name == "Pipeline":
        from taming_deploy.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
