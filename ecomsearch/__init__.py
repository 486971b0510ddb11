"""Real-time product search on NVIDIA Triton Inference Server.

Importing this package is cheap on purpose: the thin client (`ecomsearch.client`) must work with
tritonclient and numpy alone, so heavy dependencies are imported only where they are used.
"""

__version__ = "0.1.0"
