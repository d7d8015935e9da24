"""Fit, calibrate and evaluate decision gates on a timm classifier: one GPU, several, or several machines.

    python recipes/fit.py --model resnet50 --pretrained --data-dir /data/imagenet --test-split validation
    accelerate launch --multi_gpu --num_processes 8 recipes/fit.py --model resnet50 --pretrained ...

Flags follow timm's train.py; ``--help`` lists them and docs/recipes.md explains them. The
same recipe is ``timm-dgate fit`` (timm_dgate/recipe.py holds it).
"""

import sys

from timm_dgate.cli.main import fit_main

if __name__ == "__main__":
    sys.exit(fit_main())
