"""MMSegmentation 1.2.2 as a reference, in a throwaway environment (see README.md here)."""

# The MMSegmentation 1.x configs of recipes/mmseg, SegFormer-B0 first.
ZOO_CONFIGS = [
    "segformer_mit-b0_8xb2-160k_ade20k-512x512",
    "upernet_r50_4xb4-160k_ade20k-512x512",
    "deeplabv3plus_r50-d8_4xb4-160k_ade20k-512x512",
    "pspnet_r50-d8_4xb4-160k_ade20k-512x512",
    "fcn_r50-d8_4xb4-160k_ade20k-512x512",
    "fpn_r50_4xb4-160k_ade20k-512x512",
    "convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512",
    "vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512",
    "swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512",
]
