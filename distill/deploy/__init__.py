"""Models out of the toolkit: ONNX export with a parity check (`export`), INT8 static quantization (`quantize`),
graph surgery on the exported file (`onnx_graph`: BatchNorm folding, PReLU split, short names) and the export of
every finished stage of a run (`run_export`, behind `distill compare --export`). Imported only by the commands
that export: `distill run` never loads ONNX code."""
