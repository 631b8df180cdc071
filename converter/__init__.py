"""Stage 2: freeze a checkpoint's statistics, fold BN and the standardization into the linear
layers, export ONNX and prove parity with the float64 reference before writing the file.

Modules: `fold` (pure float64 array arithmetic, docs/folding.md), `frozen` (the converter's own
description of a network with frozen statistics, and its folding), `freeze` (checkpoint ->
frozen network, with the refusals), `export` (ONNX graphs, folded and unfolded), `verify` (the
parity gate), `convert` (the pipeline), `foreign` (`bnserve fold` on other frameworks' graphs),
`inspect` (describe any ONNX file), `cli`.
"""
