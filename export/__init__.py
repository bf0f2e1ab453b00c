"""The Palm model: synthetic aerial scenes, PalmNet, training, ONNX/TensorRT export, evaluation."""
