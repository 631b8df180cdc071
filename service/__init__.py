"""The prediction service: ONNX classifiers in onnxruntime, served over HTTP by gunicorn.

`service/` never imports the trainer (`models/`) or the converter (`converter/`): everything it
needs travels inside the ONNX file, so it can serve any ONNX classifier with one `[batch, F]` input.
"""
