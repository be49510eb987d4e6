"""leanserve: cost-optimized inference on Kubernetes.

Compress, gate on quality, serve on Triton, autoscale on cost.
"""

__version__ = "0.1.0"
