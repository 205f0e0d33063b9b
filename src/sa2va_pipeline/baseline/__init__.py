"""A conventional segmentation baseline (MONAI DynUNet, nnU-Net's architecture) trained, thresholded and scored
on exactly the same split, phrases and metric code as Sa2VA. Plain Python; the ``baseline`` pipeline adapts it."""
