"""What a trained model is measured and shipped with: verification, extraction, export.

  verification  insightface pair sets (.bin) and pair lists: 10-fold accuracy, TAR@FAR, spread
                over every rank; the trainer's periodic hook (build_verification)
  ijb           IJB-B / IJB-C 1:1 template verification (TAR at FAR 1e-6 ... 1e-1), insightface's
                protocol, spread over every rank; align: the 5-landmark similarity alignment
  extract       embeddings of an image folder or shards to .npy + keys
  export        fp32 backbone state dict, ONNX, class centers gathered from the head shards;
                loading a checkpoint (or an ONNX model: OnnxBackbone) for inference
"""
from .export import (OnnxExportError, export_class_centers, export_onnx, load_backbone,
                     load_for_inference, save_backbone)
from .extract import extract_embeddings
from .verification import (BinFileError, PairSet, VerificationHook, VerificationResult,
                           build_verification, decode_images, embed_images, embed_pair_set,
                           evaluate, format_table, kfold_accuracy, kfold_folds,
                           load_bin, load_pair_list, load_pair_set, tar_at_far,
                           verification_metrics, write_bin)
from .align import ARCFACE_DST, align_face, similarity_transform, warp_affine
from .export import OnnxBackbone, load_onnx_for_inference
from .ijb import (IJBError, IJBRelease, IJBResult, evaluate_ijb, format_ijb_table,
                  load_release, plot_roc, pool_templates, roc_curve, score_pairs, tar_at_fars)

__all__ = ["BinFileError", "PairSet", "VerificationHook", "VerificationResult",
           "build_verification", "decode_images", "embed_images", "embed_pair_set", "evaluate",
           "format_table", "kfold_accuracy", "kfold_folds", "load_bin",
           "load_pair_list", "load_pair_set", "tar_at_far", "verification_metrics", "write_bin",
           "extract_embeddings", "OnnxExportError", "export_class_centers", "export_onnx",
           "load_backbone", "load_for_inference", "save_backbone",
           "ARCFACE_DST", "align_face", "similarity_transform", "warp_affine", "IJBError",
           "IJBRelease", "IJBResult", "evaluate_ijb", "format_ijb_table", "load_release",
           "plot_roc", "pool_templates", "roc_curve", "score_pairs", "tar_at_fars",
           "OnnxBackbone", "load_onnx_for_inference"]
