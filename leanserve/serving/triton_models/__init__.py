"""Python-backend models leanserve copies into repositories as ``<model>/1/model.py``.

They run inside tritonserver's python backend stub, never inside leanserve, so they import only
numpy, onnxruntime, tokenizers and ``triton_python_backend_utils`` (which exists only there).
"""
