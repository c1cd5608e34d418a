"""The student where it runs: stock nnU-Net model folders, ONNX files and a fast CPU runtime.

modelfolder.py  read a trained model folder (plans, dataset.json, fold checkpoints) and rebuild its network as
                nnUNetv2_predict does; clear errors for a folder that is not ours or a missing checkpoint
export.py       a student folder -> a stock nnU-Net model folder (trainer nnUNetTrainer, the student's
                architecture in its own plans), its install zip, and ONNX files
runtime.py      the network of one fold compiled by a CPU inference runtime (OpenVINO, ONNX Runtime), as a
                torch module nnU-Net's sliding window can call
predictor.py    nnU-Net's own predictor (preprocessing, Gaussian sliding window, mirroring, resampling, export)
                with the network replaced by the runtime's
"""
