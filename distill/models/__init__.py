"""Models as things to build, save, load and measure: the model registry (`registry`: create_model, list_models,
register_model), `student.pt` files and loading any model file (`files`: save_student, load_student, load_model),
and what a model costs (`cost`: parameters, GFLOPs, CPU speed). The architectures live here too, whatever role
they play: VarGFaceNet (`vargfacenet`), arcface_torch's IResNets (`iresnet`) and timm backbones with an embedding
head (`timm_backbone`); an ONNX model is a teacher only (teachers/onnx.py)."""

from distill.models.files import load_student

__all__ = ["load_student"]  # the documented import path distill.models.load_student
