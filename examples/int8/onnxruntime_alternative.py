"""The alternative int8 quantizer, measured: ONNX Runtime's static QDQ quantization of the same student export that
`nnunetv2_recokd predict --precision int8` quantizes with NNCF for OpenVINO. Prints ms per patch (median), ONNX
Runtime float32 and int8, on the model's first fold.

    python examples/int8/onnxruntime_alternative.py MODEL_FOLDER CALIBRATION_IMAGES [--runs 10]

Needs the [deploy] extra (onnxruntime). Result on the 2-core CPU: docs/benchmarks.md#int8.
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def median_ms(path: str, x: np.ndarray, runs: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    session.run(None, {"image": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from nnunetv2_recokd.deploy.graph import split_concat_convs
    from nnunetv2_recokd.deploy.predictor import RuntimePredictor
    from nnunetv2_recokd.deploy.quantize import calibration_tiles
    from nnunetv2_recokd.deploy.runtime import export_onnx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("calibration")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    predictor = RuntimePredictor("torch")
    predictor.initialize_from_trained_model_folder(args.model, (0,), "checkpoint_final.pth")
    shape = (1, predictor.num_input_channels(), *predictor.configuration_manager.patch_size)
    cases = [[f] for f in sorted(glob.glob(str(Path(args.calibration) / "*_0000.*")))[:4]]
    tiles = calibration_tiles(predictor, cases, max_tiles=8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({"image": t} for t in tiles)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        f32, pre, int8 = (str(Path(tmp) / n) for n in ("f32.onnx", "pre.onnx", "int8.onnx"))
        export_onnx(predictor.network.eval(), shape, f32)
        onnx.save(split_concat_convs(onnx.load(f32))[0], f32)  # the graph our predict compiles
        quant_pre_process(f32, pre)
        quantize_static(pre, int8, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
        print(json.dumps({"patch": list(shape[2:]), "onnxruntime_f32_ms": median_ms(f32, tiles[0], args.runs),
                          "onnxruntime_int8_ms": median_ms(int8, tiles[0], args.runs)}))


if __name__ == "__main__":
    main()
