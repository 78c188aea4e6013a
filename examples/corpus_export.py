"""Export the corpus of real architectures to ONNX, with random (or torchvision's default-init) weights.

Runs inside the scratch venv that `examples/corpus.py export` makes (torch, torchvision, transformers, onnx,
onnxscript); quantvm itself is not imported here. For each model it writes, atomically, into the cache:
`<name>.onnx` and `<name>.json` (inputs with shapes and dtypes, opset, exporter, family, which exporter was
asked for and why another was used if so). A model whose JSON is already there is skipped.

    python examples/corpus_export.py CACHE_DIR [--models a,b] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

SEED = 0


@dataclass(frozen=True)
class Entry:
    """One corpus model: how to build it, what to feed the exporter, how to export it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]  # input name -> example tensor (its shape is the default)
    opset: int
    exporter: str  # "legacy" (dynamo=False) or "dynamo"
    family: str  # "cnn", "transformer" or "rnn": which onnxruntime int8 mode is its peer (static or dynamic)


def image(size: int, height: int | None = None) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"images": torch.randn(1, 3, height or size, size)}


def tv_classifier(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)
    return build


class FirstOutput(nn.Module):
    """Returns the tensors of a dict/tuple output (segmentation's {"out": ...}, transformers' ModelOutput)."""

    def __init__(self, inner: nn.Module, key: str | None = None):
        super().__init__()
        self.inner, self.key = inner, key

    def forward(self, *args):
        out = self.inner(*args)
        return out[self.key] if self.key is not None else out[0]


def tv_segmentation(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return FirstOutput(torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                                        aux_loss=None if name.startswith("lraspp") else False),
                           "out")
    return build


class SSDNetwork(nn.Module):
    """torchvision's SSDlite network without its transform (resize, normalise) and NMS post-processing: the
    raw box regressions and class logits of every anchor."""

    def __init__(self):
        super().__init__()
        import torchvision

        ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
        self.backbone, self.head = ssd.backbone, ssd.head

    def forward(self, images):
        features = list(self.backbone(images).values())
        out = self.head(features)
        return out["bbox_regression"], out["cls_logits"]


# --- YOLOv8-style detector: Conv-BN-SiLU, C2f (Split/Concat), SPPF (MaxPool chain), nearest Upsample, head ---

class ConvBNSiLU(nn.Module):
    def __init__(self, cin, cout, k=1, s=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * torch.sigmoid(y)  # SiLU the way many exporters write it


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBNSiLU(c, c, 3), ConvBNSiLU(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, cin, cout, n=1, shortcut=True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBNSiLU(cin, 2 * self.c)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, cout)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.cv1, self.cv2 = ConvBNSiLU(cin, cin // 2), ConvBNSiLU(cin * 2, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class YoloV8(nn.Module):
    """yolov8n-sized: width 16..256, three detect scales, DFL-free head (boxes 4*16 + 80 classes)."""

    def __init__(self, w=(16, 32, 64, 128, 256), classes=80, reg_max=16):
        super().__init__()
        self.stem = nn.Sequential(ConvBNSiLU(3, w[0], 3, 2), ConvBNSiLU(w[0], w[1], 3, 2), C2f(w[1], w[1]))
        self.p3 = nn.Sequential(ConvBNSiLU(w[1], w[2], 3, 2), C2f(w[2], w[2], 2))
        self.p4 = nn.Sequential(ConvBNSiLU(w[2], w[3], 3, 2), C2f(w[3], w[3], 2))
        self.p5 = nn.Sequential(ConvBNSiLU(w[3], w[4], 3, 2), C2f(w[4], w[4]), SPPF(w[4], w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4, self.td3 = C2f(w[4] + w[3], w[3], shortcut=False), C2f(w[3] + w[2], w[2], shortcut=False)
        self.down3, self.bu4 = ConvBNSiLU(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3], shortcut=False)
        self.down4, self.bu5 = ConvBNSiLU(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4], shortcut=False)
        self.heads = nn.ModuleList(
            nn.ModuleDict({"box": nn.Sequential(ConvBNSiLU(c, 64, 3), ConvBNSiLU(64, 64, 3), nn.Conv2d(64, 4 * reg_max, 1)),
                           "cls": nn.Sequential(ConvBNSiLU(c, 80, 3), ConvBNSiLU(80, 80, 3), nn.Conv2d(80, classes, 1))})
            for c in (w[2], w[3], w[4]))

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        n3 = self.td3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        outs = [torch.cat([h["box"](f), h["cls"](f)], 1).flatten(2) for h, f in zip(self.heads, (n3, n4, n5))]
        return torch.cat(outs, 2)


# --- DB-style text detector: small MobileNetV3-like backbone with HardSigmoid SE, FPN, DB head ---

class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class MobileBlock(nn.Module):
    def __init__(self, cin, mid, cout, k, stride, se):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.Hardswish())
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class DBNet(nn.Module):
    def __init__(self, inner=96):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        cfg = [  # (cin, mid, cout, k, stride, se): one stage per FPN level
            [(16, 16, 16, 3, 2, True)],
            [(16, 72, 24, 3, 2, False), (24, 88, 24, 3, 1, False)],
            [(24, 96, 40, 5, 2, True), (40, 240, 40, 5, 1, True)],
            [(40, 120, 48, 5, 1, True), (48, 288, 96, 5, 2, True), (96, 576, 96, 5, 1, True)],
        ]
        self.stages = nn.ModuleList(nn.Sequential(*(MobileBlock(*c) for c in stage)) for stage in cfg)
        self.lateral = nn.ModuleList(nn.Conv2d(s[-1][2], inner, 1, bias=False) for s in cfg)
        self.smooth = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, 1, 1, bias=False) for _ in cfg)
        q = inner // 4
        self.head = nn.Sequential(
            nn.Conv2d(inner, q, 3, 1, 1, bias=False), nn.BatchNorm2d(q), nn.ReLU(),
            nn.ConvTranspose2d(q, q, 2, 2), nn.BatchNorm2d(q), nn.ReLU(),
            nn.ConvTranspose2d(q, 1, 2, 2))
        self.pre_bn = nn.BatchNorm2d(inner)  # standalone BatchNormalization, not after a conv

    def forward(self, x):
        feats, y = [], self.stem(x)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        lat = [lateral(f) for lateral, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down: upsample the coarser map onto the finer one
            lat[i - 1] = lat[i - 1] + nn.functional.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        size = lat[0].shape[2:]
        outs = [nn.functional.interpolate(s(f), size=size, mode="nearest") if i else s(f)
                for i, (s, f) in enumerate(zip(self.smooth, lat))]
        fused = self.pre_bn(torch.cat(outs, 1))
        return torch.sigmoid(self.head(fused))


# --- SVTR-style recognizer: conv stem, decomposed HardSwish, attention, decomposed LayerNorm ---

def hardswish_math(x):
    return x * torch.clamp(x + 3, 0, 6) / 6


class LayerNormMath(nn.Module):
    """LayerNorm written out: ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, then scale and shift."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c) + 0.1 * torch.randn(c)), \
            nn.Parameter(0.1 * torch.randn(c)), eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        d = x - mean
        var = d.pow(2).mean(-1, keepdim=True)
        return d / torch.sqrt(var + self.eps) * self.weight + self.bias


class MixerBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = LayerNormMath(dim), LayerNormMath(dim)
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, dim * 4), nn.Linear(dim * 4, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(hardswish_math(self.fc1(self.norm2(x))))


class SVTR(nn.Module):
    def __init__(self, dim=120, depth=4, heads=6, classes=97):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, dim // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(dim // 2)
        self.conv2, self.bn2 = nn.Conv2d(dim // 2, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim)
        self.blocks = nn.ModuleList(MixerBlock(dim, heads) for _ in range(depth))
        self.norm = LayerNormMath(dim)
        self.pool = nn.AdaptiveAvgPool2d((1, 40))
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        x = hardswish_math(self.bn1(self.conv1(x)))
        x = hardswish_math(self.bn2(self.conv2(x)))  # [1, dim, 12, 80]
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).transpose(1, 2).reshape(b, c, h, w)
        x = self.pool(x).squeeze(2).transpose(1, 2)  # [1, 40, dim]
        return torch.softmax(self.fc(x), -1)


class CRNN(nn.Module):
    """Conv stack, then a bidirectional LSTM over the width, then per-step class logits."""

    def __init__(self, classes=97):
        super().__init__()
        layers, cin = [], 3
        for cout, pool in ((32, (2, 2)), (64, (2, 2)), (128, (2, 1)), (128, (2, 1))):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(pool)]
            cin = cout
        self.convs = nn.Sequential(*layers)
        self.rnn = nn.LSTM(128 * 2, 96, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(192, classes)

    def forward(self, x):
        y = self.convs(x)  # [1, 128, 2, 80]
        y = y.flatten(1, 2).transpose(1, 2)
        return self.fc(self.rnn(y)[0])


# --- audio: streaming voice activity (recurrent state input), keyword spotting, a dilated Conv1d stack ---

class StreamingVAD(nn.Module):
    """Silero-VAD-like: audio chunk [1, 576] and state [2, 1, 128] (h, c) in; speech probability and the next
    state out. A learned STFT-like Conv1d front end, Conv1d encoder, one LSTM cell step."""

    def __init__(self, hidden=128):
        super().__init__()
        self.stft = nn.Conv1d(1, 130, 256, stride=128, padding=64, bias=False)
        self.encoder = nn.Sequential(
            nn.Conv1d(65, 128, 3, padding=1), nn.ReLU(), nn.Conv1d(128, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Conv1d(64, hidden, 3, padding=1), nn.ReLU())
        self.cell = nn.LSTMCell(hidden, hidden)
        self.decoder = nn.Conv1d(hidden, 1, 1)
        self.keep_scale()

    def keep_scale(self):
        """Weights drawn so the signal keeps its size through the network, as a trained VAD's does. Under
        PyTorch's default init (gain 1/sqrt(3) per layer, then ReLU) the encoder shrank the features some
        fifteenfold and the one LSTM step from a zero state shrank them again: the speech probability moved by
        3e-5 of its value between random chunks, so it compared a bias with a bias."""
        with torch.no_grad():
            nn.init.normal_(self.stft.weight, std=self.stft.weight[0].numel() ** -0.5)  # a unit-gain filter bank
            for conv in (m for m in self.encoder if isinstance(m, nn.Conv1d)):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
            nn.init.normal_(self.cell.weight_ih, std=self.cell.input_size ** -0.5)
            nn.init.kaiming_normal_(self.decoder.weight, nonlinearity="relu")  # it reads relu(h)

    def forward(self, audio, state):
        spec = self.stft(audio.unsqueeze(1))
        real, imag = spec[:, :65], spec[:, 65:]
        mag = torch.sqrt(real * real + imag * imag + 1e-9)
        feat = self.encoder(mag).mean(-1)
        h, c = self.cell(feat, (state[0], state[1]))
        prob = torch.sigmoid(self.decoder(torch.relu(h).unsqueeze(-1))).squeeze(-1)
        return prob, torch.stack([h, c])


class StreamingGRU(nn.Module):
    """Audio chunk [1, 576] and GRU state [2, 1, 128] (two layers): Conv1d features, GRU, sigmoid."""

    def __init__(self, hidden=128):
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(1, 64, 64, stride=32, padding=16), nn.ReLU(),
                                   nn.Conv1d(64, 96, 3, padding=1), nn.ReLU())
        self.gru = nn.GRU(96, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, audio, state):
        feat = self.front(audio.unsqueeze(1)).transpose(1, 2)
        y, next_state = self.gru(feat, state)
        return torch.sigmoid(self.out(y[:, -1])), next_state


class KeywordSpotter(nn.Module):
    """M5-style: Conv1d/BN/ReLU/MaxPool1d stack on one second of 16 kHz audio, global pool, linear."""

    def __init__(self, classes=35, c=64):
        super().__init__()
        layers, cin = [], 1
        for i, (cout, k, s) in enumerate(((c, 80, 16), (c, 3, 1), (2 * c, 3, 1), (2 * c, 3, 1))):
            layers += [nn.Conv1d(cin, cout, k, s), nn.BatchNorm1d(cout), nn.ReLU(), nn.MaxPool1d(4 if i < 3 else 2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return torch.log_softmax(self.fc(self.features(x).mean(-1)), -1)


class DilatedTCN(nn.Module):
    """A temporal convolution stack: dilated Conv1d residual blocks with GELU and GroupNorm-free BatchNorm."""

    def __init__(self, c=128, blocks=6):
        super().__init__()
        self.inp = nn.Conv1d(40, c, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(c, c, 3, padding=2 ** i, dilation=2 ** i, groups=c), nn.BatchNorm1d(c), nn.GELU(),
                          nn.Conv1d(c, c, 1)) for i in range(blocks))
        self.out = nn.Conv1d(c, 12, 1)

    def forward(self, x):
        y = self.inp(x)
        for b in self.blocks:
            y = y + b(y)
        return self.out(y)


# --- transformers, random-initialised from configs ---

def hf_model(kind: str, **config) -> Callable[[], nn.Module]:
    def build():
        import transformers

        cls_config, cls_model = {"bert": ("BertConfig", "BertModel"), "distilbert": ("DistilBertConfig", "DistilBertModel"),
                                 "gpt2": ("GPT2Config", "GPT2Model")}[kind]
        cfg = getattr(transformers, cls_config)(**config)
        cfg._attn_implementation = "eager"
        if kind == "gpt2":
            cfg.use_cache = False
        torch.manual_seed(SEED)
        model = getattr(transformers, cls_model)(cfg)
        return AllTokensMask(model) if kind == "gpt2" else FirstOutput(model)
    return build


class AllTokensMask(nn.Module):
    """A decoder fed input_ids only, given an attention mask of ones made inside (the same output). Without a
    mask, transformers 5 looks for packed sequences in the position ids while tracing (torch.diff, which the
    legacy exporter cannot write); with one it does not, and older transformers just apply the mask."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids, attention_mask=torch.ones_like(input_ids))[0]


def tokens(*names: str, seq: int = 128, vocab: int = 30522) -> Callable[[], dict[str, torch.Tensor]]:
    """Token ids drawn from the global generator (seeded by export), like the other models' inputs: each call
    a new draw, or check_outputs_vary would compare the output for one input with itself."""
    def make():
        feeds = {"input_ids": torch.randint(0, vocab, (1, seq))}
        if "attention_mask" in names:
            feeds["attention_mask"] = torch.ones(1, seq, dtype=torch.int64)
        if "token_type_ids" in names:
            feeds["token_type_ids"] = torch.zeros(1, seq, dtype=torch.int64)
        return feeds
    return make


def audio_state(samples: int = 576, layers: int = 2, hidden: int = 128):
    return lambda: {"audio": torch.randn(1, samples), "state": torch.zeros(layers, 1, hidden)}


BERT = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072)
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

ENTRIES = [
    Entry("resnet18", tv_classifier("resnet18"), image(224), 11, "legacy", "cnn"),
    Entry("resnet50", tv_classifier("resnet50"), image(224), 18, "dynamo", "cnn"),
    Entry("mobilenet_v2", tv_classifier("mobilenet_v2"), image(224), 12, "legacy", "cnn"),
    Entry("mobilenet_v3_small", tv_classifier("mobilenet_v3_small"), image(224), 13, "legacy", "cnn"),
    Entry("mobilenet_v3_large", tv_classifier("mobilenet_v3_large"), image(224), 18, "dynamo", "cnn"),
    Entry("efficientnet_b0", tv_classifier("efficientnet_b0"), image(224), 13, "legacy", "cnn"),
    Entry("regnet_y_400mf", tv_classifier("regnet_y_400mf"), image(224), 14, "legacy", "cnn"),
    Entry("shufflenet_v2_x1_0", tv_classifier("shufflenet_v2_x1_0"), image(224), 11, "legacy", "cnn"),
    Entry("squeezenet1_1", tv_classifier("squeezenet1_1"), image(224), 12, "legacy", "cnn"),
    Entry("densenet121", tv_classifier("densenet121"), image(224), 15, "legacy", "cnn"),
    Entry("googlenet", tv_classifier("googlenet", aux_logits=False, init_weights=True), image(224), 16, "legacy", "cnn"),
    Entry("inception_v3", tv_classifier("inception_v3", aux_logits=False, init_weights=True), image(299), 17,
          "legacy", "cnn"),
    Entry("convnext_tiny", tv_classifier("convnext_tiny"), image(224), 18, "dynamo", "cnn"),
    Entry("vit_b_16", tv_classifier("vit_b_16"), image(224), 17, "legacy", "transformer"),
    Entry("swin_t", tv_classifier("swin_t"), image(224), 18, "dynamo", "transformer"),
    Entry("deeplabv3_mobilenet_v3", tv_segmentation("deeplabv3_mobilenet_v3_large"), image(320), 16, "legacy", "cnn"),
    Entry("lraspp_mobilenet_v3", tv_segmentation("lraspp_mobilenet_v3_large"), image(320), 13, "legacy", "cnn"),
    Entry("fcn_resnet50", tv_segmentation("fcn_resnet50"), image(256), 18, "dynamo", "cnn"),
    Entry("ssdlite320_mobilenet_v3", SSDNetwork, image(320), 14, "legacy", "cnn"),
    Entry("yolov8_style", YoloV8, image(320), 12, "legacy", "cnn"),
    Entry("yolov8_style_dynamo", YoloV8, image(320), 18, "dynamo", "cnn"),
    Entry("db_text_detector", DBNet, image(640), 11, "legacy", "cnn"),
    Entry("svtr_recognizer", SVTR, image(320, 48), 14, "legacy", "transformer"),
    Entry("crnn_lstm", CRNN, image(320, 32), 11, "legacy", "rnn"),
    Entry("bert_2l", hf_model("bert", **BERT), tokens(*BERT_INPUTS), 14, "legacy", "transformer"),
    Entry("distilbert_2l", hf_model("distilbert", n_layers=2), tokens("input_ids", "attention_mask"), 18, "dynamo",
          "transformer"),
    Entry("minilm_l6", hf_model("bert", **MINILM), tokens(*BERT_INPUTS), 17, "legacy", "transformer"),
    Entry("gpt2_2l", hf_model("gpt2", n_layer=2, n_positions=128), tokens("input_ids", vocab=50257), 15, "legacy",
          "transformer"),
    Entry("vad_lstm_streaming", StreamingVAD, audio_state(), 16, "legacy", "rnn"),
    Entry("vad_gru_streaming", StreamingGRU, audio_state(), 18, "dynamo", "rnn"),
    Entry("kws_conv1d", KeywordSpotter, lambda: {"audio": torch.randn(1, 1, 16000)}, 13, "legacy", "cnn"),
    Entry("tcn_conv1d", DilatedTCN, lambda: {"features": torch.randn(1, 40, 200)}, 18, "dynamo", "cnn"),
]


def export(entry: Entry, path: Path, exporter: str) -> None:
    torch.manual_seed(SEED)
    model = entry.build().eval()
    redraw_zero_weights(model)
    settle_batch_norms(model, entry)
    check_outputs_vary(model, entry)
    feeds = entry.inputs()
    with torch.no_grad():
        model(*feeds.values())  # a model that does not run in torch is not an export failure
        kwargs = {"external_data": False} if exporter == "dynamo" else {}
        torch.onnx.export(model, tuple(feeds.values()), str(path), input_names=list(feeds),
                          opset_version=entry.opset, dynamo=exporter == "dynamo", **kwargs)


def redraw_zero_weights(model: nn.Module) -> None:
    """Weights a default init leaves at zero (torchvision's ViT head) are drawn at random: a constant
    output would let the numerics check pass on any compiled code."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                nn.init.normal_(param, std=param.shape[-1] ** -0.5)


def settle_batch_norms(model: nn.Module, entry: Entry) -> None:
    """BatchNorm statistics measured on random inputs (one pass, its batch statistics kept), as training
    would leave them. With the default ones (mean 0, variance 1) activations shrink layer by layer under
    default init: DeepLabV3's and SSDlite's outputs came out constant, their numerics checks comparing biases."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    draws = [entry.inputs() for _ in range(2)]  # two samples: a 1x1 map's batch statistics need more than one
    batch = [torch.cat([d[name] for d in draws]) for name in draws[0]]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the cumulative average: after one pass, that pass's statistics
        norm.train()
    with torch.no_grad():
        model(*batch)
    model.eval()


def check_outputs_vary(model: nn.Module, entry: Entry, min_change: float = 1e-3) -> None:
    """Every output must change with the input, or comparing it with onnxruntime checks nothing."""
    feeds = [entry.inputs() for _ in range(2)]
    if all(torch.equal(a, b) for a, b in zip(feeds[0].values(), feeds[1].values())):
        raise RuntimeError(f"{entry.name}: its inputs() gave the same input twice, so nothing can vary")
    with torch.no_grad():
        first, second = (_tensors(model(*f.values())) for f in feeds)
    for index, (a, b) in enumerate(zip(first, second)):
        scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
        if float((a - b).abs().max()) < min_change * scale:
            raise RuntimeError(f"{entry.name}: output {index} {tuple(a.shape)} does not depend on the input")


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _tensors(item)]


def write_entry(entry: Entry, cache: Path) -> dict:
    """Export (the other exporter if the asked one fails), check, and move into the cache atomically."""
    import onnx

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{entry.name}-") as work:
        tmp = Path(work) / f"{entry.name}.onnx"
        exporter, note = entry.exporter, None
        try:
            export(entry, tmp, exporter)
        except Exception as err:  # noqa: BLE001 (recorded, then the other exporter is tried)
            note = f"{exporter} exporter failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})"
            exporter = "dynamo" if exporter == "legacy" else "legacy"
            export(entry, tmp, exporter)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        info = {"name": entry.name, "family": entry.family, "exporter": exporter, "exporter_asked": entry.exporter,
                "exporter_note": note, "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                "ops": len(model.graph.node), "inputs": input_specs(model), "torch": torch.__version__,
                "export_seconds": round(time.perf_counter() - started, 1)}
        os.replace(tmp, cache / f"{entry.name}.onnx")
    json_tmp = cache / f".{entry.name}.json.tmp"
    json_tmp.write_text(json.dumps(info, indent=1))
    os.replace(json_tmp, cache / f"{entry.name}.json")  # written last: its presence means the entry is complete
    return info


def input_specs(model) -> list[dict]:
    import onnx

    weights = {t.name for t in model.graph.initializer}
    return [{"name": v.name, "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
             "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
            for v in model.graph.input if v.name not in weights]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--models", help="comma-separated names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(e.name for e in ENTRIES))
        return 0
    wanted = set(args.models.split(",")) if args.models else None
    unknown = (wanted or set()) - {e.name for e in ENTRIES}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; --list names them")
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    failed = []
    for entry in ENTRIES:
        if wanted is not None and entry.name not in wanted:
            continue
        if (args.cache / f"{entry.name}.json").exists():
            print(f"{entry.name}: cached", flush=True)
            continue
        try:
            info = write_entry(entry, args.cache)
        except Exception as err:  # noqa: BLE001 (one model's failure must not stop the others)
            traceback.print_exc(limit=3)
            failed.append(entry.name)
            print(f"{entry.name}: FAILED {type(err).__name__}: {str(err).strip()[:300]}", flush=True)
            continue
        print(f"{entry.name}: {info['exporter']} opset {info['opset']}, {info['ops']} ops, "
              f"{info['export_seconds']} s", flush=True)
    if failed:
        print(f"{len(failed)} export(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
