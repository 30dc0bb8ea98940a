"""ONNX / TensorRT export and the runtime backends the engine chooses between."""
