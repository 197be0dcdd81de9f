"""xvr_batch: batch SWIN-XVR reconstruction of high-speed x-ray imaging archives."""

__version__ = "0.1.0"
