"""Triton kernels of the lora ops and the registration of the ops' CUDA kernels."""
