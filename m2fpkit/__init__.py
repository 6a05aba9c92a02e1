"""m2fpkit: versioned M2FP human-parsing models on CPU boxes.

Subpackages (dependencies point one way: server -> runtime; export stands beside):

- :mod:`m2fpkit.runtime` -- bundle format, onnxruntime sessions, inference, version registry.
- :mod:`m2fpkit.server` -- the aiohttp server.
- :mod:`m2fpkit.export` -- M2FP in PyTorch, checkpoint sources, ONNX export (needs the ``[export]`` extra).
"""

__version__ = "0.1.0"
