"""Train the built-in demo model: a small residual CNN on scikit-learn's bundled digits.

Run from the repository root with torch and scikit-learn installed (neither is a quantvm dependency):

    python -m compiler.demo_model.train_digits

It writes `digits_cnn.onnx` (Conv+BN+ReLU blocks, a residual Add, a Gemm head; BatchNorm left unfolded so
the fusion passes have real work), `digits_holdout.npz` (the held-out 20% the model never saw in training,
for accuracy) and `digits_calib.npz` (256 training images, for INT8 calibration) next to this file. Training is seeded, so a rerun gives the same split and nearly the same weights.
"""

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SEED = 0


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block_a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block_b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2)
        self.wide = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        stem = self.stem(x)
        y = torch.relu(self.block_b(self.block_a(stem)) + stem)
        y = self.wide(self.pool(y))
        return self.head(y.mean(dim=(2, 3)))


def load_split():
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.2, random_state=SEED, stratify=labels)


def train(model, images, labels, epochs=60):
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval()


def to_onnx(model):
    """Write the trained network as an ONNX graph with plain onnx.helper nodes (opset 17)."""
    inits, nodes = [], []

    def const(name, tensor):
        inits.append(numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name))
        return name

    def conv_bn(prefix, seq, x, relu):
        conv, bn = seq[0], seq[1]
        w = const(f"{prefix}.conv.weight", conv.weight)
        stats = [const(f"{prefix}.bn.{k}", getattr(bn, k)) for k in ("weight", "bias", "running_mean", "running_var")]
        nodes.append(helper.make_node("Conv", [x, w], [f"{prefix}.conv"], name=f"{prefix}.conv", pads=[1, 1, 1, 1]))
        nodes.append(
            helper.make_node("BatchNormalization", [f"{prefix}.conv", *stats], [f"{prefix}.bn"],
                             name=f"{prefix}.bn", epsilon=bn.eps)
        )
        if not relu:
            return f"{prefix}.bn"
        nodes.append(helper.make_node("Relu", [f"{prefix}.bn"], [f"{prefix}.relu"], name=f"{prefix}.relu"))
        return f"{prefix}.relu"

    stem = conv_bn("stem", model.stem, INPUT_NAME, relu=True)
    a = conv_bn("block_a", model.block_a, stem, relu=True)
    b = conv_bn("block_b", model.block_b, a, relu=False)
    nodes.append(helper.make_node("Add", [b, stem], ["residual"], name="residual.add"))
    nodes.append(helper.make_node("Relu", ["residual"], ["residual.relu"], name="residual.relu"))
    nodes.append(helper.make_node("MaxPool", ["residual.relu"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    wide = conv_bn("wide", model.wide, "pool", relu=True)
    nodes.append(helper.make_node("GlobalAveragePool", [wide], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    w, bias = const("head.weight", model.head.weight), const("head.bias", model.head.bias)
    nodes.append(helper.make_node("Gemm", ["flat", w, bias], [OUTPUT_NAME], name="head.gemm", transB=1))
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="quantvm")
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


CALIBRATION_SAMPLES = 256


def write_calibration_slice(train_x):
    """Calibration data comes from the training split: the held-out images are for measuring accuracy."""
    np.savez_compressed(HERE / "digits_calib.npz", image=train_x[:CALIBRATION_SAMPLES])


def main():
    train_x, test_x, train_y, test_y = load_split()
    torch.manual_seed(SEED)
    model = DigitsCNN()
    train(model, train_x, train_y)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean()
    onnx.save(to_onnx(model), HERE / "digits_cnn.onnx")
    np.savez_compressed(HERE / "digits_holdout.npz", image=test_x, label=test_y)
    write_calibration_slice(train_x)
    print(f"held-out accuracy {accuracy:.4f} on {len(test_y)} images; wrote {HERE}")


if __name__ == "__main__":
    main()
