"""Using a trained model: ``export`` (safetensors or ONNX), ``Segmenter``, ``predict`` and
``convert`` (other frameworks' checkpoints to hooktrain's).
"""
