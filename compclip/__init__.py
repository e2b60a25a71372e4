"""compclip — compositional fine-tuning of CLIP-style models (CE-CLIP, DeGLA, C2LIP) with fused Triton losses.

Packages: ``compclip.kernels`` (Triton kernels and their references), ``compclip.losses`` (the functional loss
API and global-batch terms), ``compclip.methods``, ``compclip.data``, ``compclip.evaluation``; the entry point
is ``compclip/train.py`` (``deepspeed compclip/train.py``).
"""

__version__ = "0.1.0"
