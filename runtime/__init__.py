"""The model runtime: what runs a model bundle, shared by the node and the fleet tools.

- `runtime.backend`: the backend interface and what each backend declares (`BackendKind`);
- `runtime.registry`: the registry of backends and `auto` (which one runs a bundle here);
- `runtime.onnx_backend`, `runtime.hailo_backend`: ONNX Runtime on the CPU, HailoRT on a Hailo-8;
- `runtime.pipeline`: a loaded, golden-checked model (normalise -> backend -> motif head);
- `runtime.normalize`, `runtime.motif_head`: the steps around the backend;
- `runtime.reference`: the built-in reference TCN, written to ONNX from numpy;
- `runtime.errors`: backend and golden-check errors.

It sits between `common/` (bundle format, signing) and `node/`/`fleet/`, which both import it.
"""
