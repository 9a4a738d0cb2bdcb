"""Segmentation with SAM: loading (``sam``), the guided decoder, PerSAM's location prior and cascade.

Import from the submodules (``persam_dreambooth.segmentation.persam`` etc.); this package file stays light so that
``import persam_dreambooth.segmentation`` does not import torch.
"""
