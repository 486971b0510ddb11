"""Hand-written stand-ins for modules that only exist inside tritonserver."""
