"""bnserve: train a BN MLP (models/), fold it into ONNX (converter/), serve it (service/).

This package holds only the command dispatcher, the shared error types and `bnserve up`.
"""

__version__ = "0.1.0"
