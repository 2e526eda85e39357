"""The FIREATTN vLLM backend (the only subpackage that imports vLLM).

Submodules are imported lazily: vLLM resolves the backend class by its path
(vllm_fireattn.backend.backend.FireAttnBackend) in the worker, after plugin registration.
"""
