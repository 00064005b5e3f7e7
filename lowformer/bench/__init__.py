"""Cost and speed measurement. Heavy pieces (timing backends, ONNX) are imported where they are used."""
from lowformer.bench.complexity import count_macs, count_params, model_complexity, paper_resolution

__all__ = ["count_macs", "count_params", "model_complexity", "paper_resolution"]
