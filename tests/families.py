"""Small configurations of many timm families, for the correctness contracts.

Each entry is (timm model name, create_model overrides that shrink it, input size). The
overrides keep every model tiny so the whole matrix runs in seconds on 2 cores; the code
paths (stage modules, layouts, heads) are those of the full-size models.
"""

FAMILIES = [
    ("test_resnet", {}, 64),
    ("test_byobnet", {}, 64),
    ("test_convnext", {}, 64),
    ("test_efficientnet", {}, 64),
    ("test_mambaout", {}, 64),
    ("test_nfnet", {}, 64),
    ("test_vit", {"img_size": 64}, 64),
    ("test_vit_relpos", {"img_size": 64}, 64),
    ("test_maxvit", {}, 160),
    ("densenet121", {"growth_rate": 8, "block_config": (1, 1, 1, 1)}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("regnetx_002", {}, 64),
    ("deit_tiny_patch16_224", {"img_size": 64, "depth": 4}, 64),
    (
        "swin_tiny_patch4_window7_224",
        {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8)},
        64,
    ),
    ("levit_128s", {"img_size": 64}, 64),
    ("efficientformer_l1", {"depths": (1, 1, 1, 1)}, 224),
    ("inception_v3", {}, 75),
    ("dla46_c", {}, 64),
    ("vgg11", {"mlp_ratio": 0.0625}, 64),
    ("ghostnet_050", {}, 64),
    ("pvt_v2_b0", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("cait_xxs24_224", {"img_size": 64, "depth": 4}, 64),
    ("hgnetv2_b0", {}, 64),
    ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 4}, 56),
    ("beit_base_patch16_224", {"img_size": 64, "depth": 3, "embed_dim": 64, "num_heads": 2}, 64),
    ("davit_tiny", {"depths": (1, 1, 1, 1)}, 64),
    ("xcit_nano_12_p16_224", {"img_size": 64, "depth": 4}, 64),
    ("mobilevit_xxs", {}, 64),
    ("rexnet_100", {}, 64),
]
