"""minifpn: Feature Pyramid Networks (Lin et al., CVPR 2017) from scratch in NumPy / CuPy."""
from . import backend, functional, nn

__version__ = "0.1.0"
