"""Serving compressed models on NVIDIA Triton (DESIGN.md section 5).

repository: Triton model repositories (config.pbtxt built as a dict, cluster and local forms).
server: a real local tritonserver from the nvidia-pytriton wheel, started and reaped.
loadgen: an open-loop load generator over HTTP and gRPC.
profile: per-replica capacity at the SLO, config search and cost per million requests.
"""
