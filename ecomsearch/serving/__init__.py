"""Triton adapters: the class behind each Python model's model.py, and nothing else.

Each one reads its config and its files (through ecomsearch.paths), validates requests, and
calls the stage's computation, which lives in the core (ecomsearch.query, ecomsearch.text,
ecomsearch.ranking) where the in-process pipeline and training call it too. Classes receive the
`triton_python_backend_utils` module as an argument, so the same code runs inside Triton and in
unit tests against a hand-written fake of that module.
"""
