"""TensorRT engines for a bundle: build them (build.py), run them behind the Backend interface
(runtime.py), and decide when they are used (select.py). Importable without TensorRT or
cuda-python; those are imported, with an install hint when missing, only when an engine is built or
loaded (deps.py)."""
from taming_deploy.engines.build import build_engines
from taming_deploy.engines.runtime import TrtBackend, load_trt_backend, probe_trt_backend
from taming_deploy.engines.select import Choice, choose_backend

__all__ = ["Choice", "TrtBackend", "build_engines", "choose_backend", "load_trt_backend", "probe_trt_backend"]
