"""Anonymize stage: hide the found regions of a frame (blur, pixelate, mask)."""
