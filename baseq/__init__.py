"""baseq: low-bit post-training quantization of LLMs (QuaRot rotations + BASE-Q corrections)."""

__version__ = "0.1.0"
