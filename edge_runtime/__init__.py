"""edgeloop's on-device runtime: validate, score, flag, summarise, sync.

The device installs only this package; it never imports ``cloud`` or ``model_compile``.
"""

__version__ = "0.1.0"
