"""Evaluation: reconstruction quality of a first stage and label following of a conditional model.

``metrics`` holds the plain numbers (PSNR, LPIPS, confusion-matrix accuracy and mIoU), ``segmenter``
the small segmentation network that judges generated images (its weights ship in ``weights/``),
and ``evaluate`` the functions behind ``taming-deploy eval``.
"""
