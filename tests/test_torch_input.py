"""PyTorch in: compile(module, example_inputs=...) exports through torch.onnx and matches torch's own output."""

import sys

import numpy as np
import pytest

import compiler


def test_without_torch_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as where it is not installed
    with pytest.raises(compiler.QuantvmError, match=r'needs torch, which is not installed.*quantvm\[torch\]'):
        compiler.compile(object(), target="native", example_inputs=(np.zeros(3),))


def test_example_inputs_are_refused_for_an_onnx_model(demo_model_path):
    pytest.importorskip("torch")
    with pytest.raises(compiler.QuantvmError, match="example_inputs is for PyTorch modules"):
        compiler.compile(demo_model_path, target="native", example_inputs=(np.zeros(3),))


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _cnn(torch):
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10)).eval()


def test_a_torch_module_compiles_and_matches_torch_in_fp32_and_int8(torch):
    module = _cnn(torch)
    with torch.no_grad():
        module[1].running_mean.uniform_(-0.5, 0.5)  # a BN that is not the identity
        module[1].running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 2, 3, 16, 16)).astype(np.float32)
    example = torch.from_numpy(images[0])
    with torch.no_grad():
        expected = [module(torch.from_numpy(x)).numpy() for x in images]
    fp32 = compiler.compile(module, target="native", example_inputs=(example,))
    assert [(s.name, s.shape) for s in fp32.inputs] == [("input", (2, 3, 16, 16))]  # Sequential.forward(input)
    assert module.training is False
    for x, want in zip(images, expected):
        np.testing.assert_allclose(fp32.run(input=x)[0], want, rtol=1e-4, atol=1e-4)
    int8 = compiler.compile(module, target="native", example_inputs=example, calib=[{"input": x} for x in images])
    assert int8.report.quantization.int8_ops.get("conv2d") == 2
    got = int8.run(input=images[0])[0]
    cosine = float(np.sum(got * expected[0]) / (np.linalg.norm(got) * np.linalg.norm(expected[0])))
    assert cosine > 0.99


def test_inputs_are_named_after_forward_and_a_training_module_is_left_training(torch):
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, tokens, mask):
            return self.drop(self.fc(tokens)) * mask

    module = TwoInputs().train()
    tokens, mask = torch.randn(2, 8), torch.ones(2, 4)
    built = compiler.compile(module, target="native", example_inputs=(tokens, mask))
    assert [s.name for s in built.inputs] == ["tokens", "mask"] and module.training
    module.eval()
    with torch.no_grad():
        want = module(tokens, mask).numpy()
    np.testing.assert_allclose(built.run(tokens=tokens.numpy(), mask=mask.numpy())[0], want, rtol=1e-5, atol=1e-5)


def test_a_module_without_example_inputs_or_with_bad_ones_is_a_model_error(torch):
    module = _cnn(torch)
    with pytest.raises(compiler.ModelError, match="needs example_inputs"):
        compiler.compile(module, target="native")
    with pytest.raises(compiler.ModelError, match="example_inputs must be a torch.Tensor.*a tuple of ndarray"):
        compiler.compile(module, target="native", example_inputs=(np.zeros((1, 3, 8, 8), np.float32),))
    with pytest.raises(compiler.ModelError, match="cannot export the PyTorch module Sequential"):
        compiler.compile(module, target="native", example_inputs=(torch.zeros(1, 5, 8, 8),))  # 5 channels, not 3
