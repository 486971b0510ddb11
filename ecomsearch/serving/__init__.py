"""Logic behind the Triton Python models; each model.py is a thin adapter over one class here.

Classes receive the `triton_python_backend_utils` module as an argument, so the same code runs
inside Triton and in unit tests against a hand-written fake of that module.
"""
