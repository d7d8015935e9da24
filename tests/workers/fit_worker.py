"""Fit gates on a Fashion-MNIST slice under Accelerate and save each rank's gates.

Run by tests/test_accelerate.py, once as one plain process and once under
``accelerate launch --multi_gpu --num_processes 2`` on the CPU.
"""

import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import timm_dgate
from timm_dgate.fashion_mnist import load_splits, preprocess

KINDS = {"linear": 0, "mlp": 16}  # gate_hidden of each fit


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(even_batches=False))
    images, labels = load_splits(val_size=1000, limit=600).train.tensors
    loader = DataLoader(TensorDataset(preprocess(images, 32), labels), batch_size=64, shuffle=False)
    for kind, hidden in KINDS.items():
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=10).eval()
        gated = timm_dgate.wrap(model, input_size=(1, 32, 32), gate_hidden=hidden)
        # mini-batches of 128 of the 600 images: every step mixes both processes' shards
        report = timm_dgate.fit(gated, accelerator.prepare(loader), loss="ce", epochs=8, batch_size=128,
                                accelerator=accelerator, progress=False)
        state = {k: v.contiguous() for k, v in gated.gates.state_dict().items()}
        name = f"{kind}_rank{accelerator.process_index}_of{accelerator.num_processes}.safetensors"
        save_file(state, str(out / name), metadata={"num_samples": str(report.num_samples)})

if __name__ == "__main__":
    main(Path(sys.argv[1]))
