"""Model bundles on the fleet side: building them from an ONNX file, inspecting them."""
