"""The PerSAM method with SAM: loading (``sam``), the guided decoder, PerSAM's location prior, reference cells and
cascade, PerSAM-F (``persam_f``, ``scale_fit``), several instances, and the reference path (``reference_prompt``).

Batch jobs over many photos (threads, JSONL logs, resume, sharding, the embedding cache) live one layer up, in
:mod:`persam_dreambooth.albums`. Import from the submodules (``persam_dreambooth.segmentation.persam`` etc.); this
package file stays light so that ``import persam_dreambooth.segmentation`` does not import torch.
"""
