"""Integrations with timm and segmentation-models-pytorch (active on `import lit_attn`)."""
