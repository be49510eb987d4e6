"""leanserve: cost-optimized inference on Kubernetes (compress, gate, serve on Triton, autoscale)."""

__version__ = "0.1.0"
