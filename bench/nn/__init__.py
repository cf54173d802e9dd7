"""Neural-network building blocks and the training loop: augmentation, losses, SSIM, the U-Net,
the masked autoencoder, classifier training. Imports only :mod:`bench.core`.
"""
