"""`quantvm demo`: the whole path on the built-in digits CNN, with no download.

Compiles the model for this host and for cascadelake, runs the host build on the held-out digits, checks it
against ONNX's own reference implementation (onnx.reference, numpy-based), exports both builds, reloads the
host one in this process through `load()`, and shows how a cascadelake artifact is treated on this host.
"""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from compiler.artifact import read_metadata
from compiler.build import compile
from compiler.errors import HostMismatchError
from compiler.runtime import load
from targets import host_cpu, missing_features

BATCH = 40  # the held-out 360 images run as 9 batches of 40
TOLERANCE = 1e-4  # max |quantvm - reference| on the logits, relative to their largest magnitude


def demo_files() -> tuple[Path, Path]:
    folder = resources.files("compiler.demo_model")
    return Path(str(folder / "digits_cnn.onnx")), Path(str(folder / "digits_holdout.npz"))


def calibration_file() -> Path:
    return Path(str(resources.files("compiler.demo_model") / "digits_calib.npz"))


def predict(model, images: np.ndarray) -> np.ndarray:
    """The model's first output on `images`, BATCH at a time."""
    return np.concatenate([model(images[i:i + BATCH])[0] for i in range(0, len(images), BATCH)])


def reference_outputs(model_path: Path, images: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(model_path)).run(None, {"image": images})[0]


def run_demo(keep: Path | None = None) -> bool:
    model_path, data_path = demo_files()
    data = np.load(data_path)
    images, labels = data["image"], data["label"]
    shapes = {"image": (BATCH,) + images.shape[1:]}
    print(f"built-in model: {model_path.name} (residual CNN, Conv+BN+ReLU blocks, Gemm head), "
          f"{model_path.stat().st_size / 1024:.0f} KiB; held-out digits: {len(labels)} images")

    with tempfile.TemporaryDirectory(prefix="quantvm-demo-") as tmp:
        out_dir = keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)

        host = compile(model_path, target="native", input_shapes=shapes)
        print(f"[native]      compiled for this host ({host_cpu()}) in {host.compile_seconds:.1f} s")
        logits = predict(host, images)
        reference = reference_outputs(model_path, images)
        error = float(np.abs(logits - reference).max() / np.abs(reference).max())
        agree = float((logits.argmax(1) == reference.argmax(1)).mean())
        accuracy = float((logits.argmax(1) == labels).mean())
        ref_accuracy = float((reference.argmax(1) == labels).mean())
        print(f"[native]      accuracy {accuracy:.2%} (reference {ref_accuracy:.2%}); max relative error vs "
              f"onnx.reference {error:.1e}; same prediction on {agree:.2%} of images")

        host_so = host.export(out_dir / "digits_native.so")
        reloaded = predict(load(host_so), images)
        reload_ok = bool(np.array_equal(reloaded, logits))
        print(f"[native]      exported {host_so.name} ({host_so.stat().st_size / 1024:.0f} KiB); reloaded with "
              f"load(): outputs {'identical' if reload_ok else 'DIFFER'}")

        int8_ok = _show_int8(model_path, shapes, images, labels, host, accuracy)

        xeon = compile(model_path, target="cascadelake", input_shapes=shapes)
        xeon_so = xeon.export(out_dir / "digits_cascadelake.so")
        print(f"[cascadelake] compiled in {xeon.compile_seconds:.1f} s, exported {xeon_so.name} "
              f"({xeon_so.stat().st_size / 1024:.0f} KiB), needs: {' '.join(xeon.metadata.target.required_features)}")
        xeon_ok = _show_cascadelake_on_this_host(xeon_so, images, logits)
        if keep:
            print(f"artifacts kept in {out_dir}")

    return error <= TOLERANCE and agree == 1.0 and reload_ok and xeon_ok and int8_ok


INT8_TOLERANCE = 0.005  # the accuracy int8 may lose against fp32 on the held-out digits


def _show_int8(model_path, shapes, images, labels, fp32_model, fp32_accuracy) -> bool:
    from compiler.bench import Contender, interleave

    calib = np.load(calibration_file())["image"]
    calib = calib[: len(calib) // BATCH * BATCH]  # whole batches only
    int8 = compile(model_path, target="native", input_shapes=shapes, calib=[calib])
    accuracy = float((predict(int8, images).argmax(1) == labels).mean())
    quant = int8.report.quantization
    print(f"[native int8] {sum(quant.int8_ops.values())} int8 ops, {quant.calib_mode} calibration on {len(calib)} training "
          f"images, compiled in {int8.compile_seconds:.1f} s; accuracy {accuracy:.2%} (fp32 {fp32_accuracy:.2%})")
    contenders = [Contender("int8", lambda f: int8.run(**f)), Contender("fp32", lambda f: fp32_model.run(**f))]
    interleave(contenders, {"image": images[:BATCH]}, rounds=20)
    ratio = float(np.median(contenders[1].seconds) / np.median(contenders[0].seconds))
    print(f"[native int8] speed: int8 runs {ratio:.2f}x the fp32 build's speed on this host (a tiny model: mostly kernel launches)")
    return fp32_accuracy - accuracy <= INT8_TOLERANCE


def _show_cascadelake_on_this_host(path: Path, images, host_logits) -> bool:
    missing = missing_features(read_metadata(path).target.required_features)
    try:
        outputs = predict(load(path), images)
    except HostMismatchError as err:
        print(f"[cascadelake] refused on this host, as it must be: {err}")
        return bool(missing)
    close = bool(np.allclose(outputs, host_logits, rtol=1e-4, atol=1e-4))
    print(f"[cascadelake] this host can run it: outputs {'match' if close else 'DIFFER from'} the host build")
    return close and not missing
