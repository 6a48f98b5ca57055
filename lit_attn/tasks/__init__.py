"""LightningModules: segmentation and classification tasks."""
from .classification import ClassificationTask
from .inference import segment, slide_inference, whole_inference
from .losses import SegmentationLoss, ohem_cross_entropy
from .segmentation import SegmentationTask

__all__ = ["ClassificationTask", "SegmentationLoss", "SegmentationTask", "ohem_cross_entropy", "segment",
           "slide_inference", "whole_inference"]
