"""Small configurations of many timm families, for the correctness contracts.

Each entry is (timm model name, create_model overrides that shrink it, input size). The
overrides keep every model tiny so the whole matrix runs in seconds on 2 cores; the code
paths (stage modules, layouts, heads) are those of the full-size models. ``COVERS`` names
the families that stand for each kind of stage output, checked on the wrapped model.
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
    ("pit_ti_224", {"img_size": 64, "depth": (1, 1, 1)}, 64),
    ("efficientvim_m1", {"depths": (1, 1, 1)}, 64),
    (
        "tnt_s_legacy_patch16_224",
        {"img_size": 64, "depth": 3, "embed_dim": 64, "inner_dim": 8, "num_heads_inner": 2, "num_heads_outer": 2},
        64,
    ),
    ("mvitv2_tiny", {}, 64),
    ("crossvit_tiny_240", {"depth": ((1, 1, 0),) * 3}, 240),
    ("hrnet_w18_small", {}, 64),
    ("xception41p", {}, 64),
    ("gemma4_vit_167m", {"depth": 3, "embed_dim": 64, "num_heads": 2}, 64),
    (
        "samvit_base_patch16_224",
        {"img_size": 64, "depth": 3, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": ()},
        64,
    ),
    ("sequencer2d_s", {"layers": (1, 1, 1, 1)}, 64),
    ("vit_small_patch16_224", {"img_size": 64, "depth": 3, "reg_tokens": 4, "embed_dim": 64, "num_heads": 2}, 64),
    ("mixer_s16_224", {"img_size": 64}, 64),
    ("starnet_s050", {}, 64),
    ("inception_next_atto", {}, 64),
    ("swinv2_cr_tiny_ns_224", {"img_size": 64, "depths": (1, 1, 1, 1), "window_size": 4}, 64),
]

# what a family in the matrix stands for: the contracts hold for every layout and stage output
COVERS = {
    "test_resnet": "NCHW",
    "test_mambaout": "NHWC",
    "swin_tiny_patch4_window7_224": "NHWC",
    "samvit_base_patch16_224": "NHWC",
    "deit_tiny_patch16_224": "tokens with prefix tokens",
    "vit_small_patch16_224": "tokens with prefix tokens",  # a class token and 4 registers
    "mixer_s16_224": "tokens without prefix tokens",
    "levit_128s": "tokens without prefix tokens",
    "pit_ti_224": "tuple",  # (NCHW tokens, class tokens)
    "efficientvim_m1": "tuple",  # (features, next stage's input, state)
    "tnt_s_legacy_patch16_224": "tuple",  # (pixel tokens with B * N rows, patch tokens)
    "crossvit_tiny_240": "list",  # one token tensor per branch
    "hrnet_w18_small": "list",  # one tensor per resolution
    "xception41p": "realigned shortcut",
    "gemma4_vit_167m": "realigned shortcut",  # the rotary table built before the blocks
}
