"""ssn-deploy: distribution-aware semi-supervised neuron segmentation, built for deployment."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ssn-deploy")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
