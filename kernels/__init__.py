"""kvtide.kernels: Triton kernels and their pure-torch twins; imports only torch/triton."""
