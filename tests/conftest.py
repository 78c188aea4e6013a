import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


@pytest.fixture(scope="session")
def demo_model_path():
    from compiler.demo import demo_files

    return demo_files()[0]


@pytest.fixture(scope="session")
def digits_builds(tmp_path_factory, demo_model_path):
    """The demo model compiled and exported once per session, for this host and for cascadelake."""
    import compiler

    folder = tmp_path_factory.mktemp("artifacts")
    builds = {}
    for target in ("native", "cascadelake"):
        model = compiler.compile(demo_model_path, target=target, input_shapes={"image": (4, 1, 8, 8)})
        builds[target] = (model, model.export(folder / f"digits_{target}.so"))
    return builds


@pytest.fixture(scope="session")
def foreign_build(digits_builds, tmp_path_factory, demo_model_path):
    """The demo model built for a target this host lacks features for (tests/host_targets.py chooses it):
    (target name, missing features, compiled model, exported path)."""
    import compiler
    from tests.host_targets import foreign_target

    name, missing = foreign_target()
    if name in digits_builds:
        return (name, missing, *digits_builds[name])
    model = compiler.compile(demo_model_path, target=name, input_shapes={"image": (4, 1, 8, 8)})
    return name, missing, model, model.export(tmp_path_factory.mktemp("foreign") / f"digits_{name}.so")
