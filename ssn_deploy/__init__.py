"""ssn-deploy: distribution-aware semi-supervised neuron segmentation, built for deployment."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ssn-deploy")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "evaluate", "infer", "segment"]


def __getattr__(name: str):
    """``ssn_deploy.infer`` / ``segment`` / ``evaluate`` (imported on first use: importing the
    package stays cheap, without torch)."""
    if name in ("infer", "segment", "evaluate"):
        from ssn_deploy import api

        return getattr(api, name)
    raise AttributeError(f"module 'ssn_deploy' has no attribute {name!r}")
