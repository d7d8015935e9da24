"""Running a gated model outside eager PyTorch: the segment cut (for ``compile()`` and export),
``export`` to ONNX or ``torch.export`` files, and the runtime that exits early over those files.

Imports ``core``; never ``models``, so a deployed folder runs without the gated model's code.
"""
