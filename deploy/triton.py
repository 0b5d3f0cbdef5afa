"""Triton model repository from an exported ONNX file: DIR/<name>/config.pbtxt and DIR/<name>/1/model.onnx."""
from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from deploy.runtime import INPUT_NAME, OUTPUT_NAMES

MAX_BATCH = 8


def _dims(value_info: onnx.ValueInfoProto) -> list[int]:
    """Per-sample dims of a graph input/output (batch axis dropped; symbolic axes become -1, variable in Triton)."""
    dims = value_info.type.tensor_type.shape.dim[1:]
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def config_pbtxt(model: onnx.ModelProto, name: str, max_batch: int = MAX_BATCH) -> str:
    """Triton config text for `model`: onnxruntime backend, dynamic batching, runtime tensor names."""
    graph = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    if INPUT_NAME not in graph or any(n not in graph for n in OUTPUT_NAMES):
        raise ValueError(f"ONNX graph lacks {INPUT_NAME!r} or {OUTPUT_NAMES}: export it with `anoddpm export` first")

    def block(names: list[str]) -> str:
        rows = [f'  {{\n    name: "{n}"\n    data_type: TYPE_FP32\n    dims: {_dims(graph[n]) or [1]}\n'
                + ("" if _dims(graph[n]) else "    reshape: { shape: [ ] }\n") + "  }" for n in names]
        return ",\n".join(rows)

    outputs = [o.name for o in model.graph.output]
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch}\n'
            f"input [\n{block([INPUT_NAME])}\n]\noutput [\n{block(outputs)}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: 2000\n}}\n"
            f'instance_group [\n  {{\n    count: 1\n    kind: KIND_CPU\n  }}\n]\n')


def write_triton_repo(onnx_path: str | Path, repo_dir: str | Path, name: str = "anoddpm") -> Path:
    """Copy `onnx_path` into `repo_dir`/`name`/1/model.onnx with its config.pbtxt; returns the model folder."""
    model = onnx.load(str(onnx_path))
    folder = Path(repo_dir) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(config_pbtxt(model, name))
    return folder
