"""The unpickler's exact list: what the five pipelines need when pickled, and nothing more."""

from __future__ import annotations

import io
import pickle

import pytest

from penguins import contract
from serving.unpickler import ALLOWED_GLOBALS, RefusedPickle, load_model_pickle

NOT_NAMED_BY_THE_PACKAGED_DATA = {
    ("numpy", "bool_"), ("numpy", "float32"), ("numpy", "int32"), ("numpy", "int64"),
    ("sklearn.neighbors._ball_tree", "BallTree"), ("sklearn.neighbors._ball_tree", "newObj"),
}
"""Listed for other data: scalars of other types, and the ball tree that
KNeighborsClassifier(algorithm="auto") picks for some data instead of a KD tree."""


class _Recording(pickle.Unpickler):
    def __init__(self, payload: bytes) -> None:
        super().__init__(io.BytesIO(payload))
        self.named: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        self.named.add((module, name))
        return super().find_class(module, name)


def test_the_list_is_exactly_what_the_five_pipelines_name(published):
    named = set()
    for name in contract.MODEL_NAMES:
        payload = pickle.dumps(published.trained[name].pipeline, protocol=5)
        recording = _Recording(payload)
        recording.load()
        named |= recording.named
        model = load_model_pickle(payload)
        assert type(model) is type(published.trained[name].pipeline)
    assert named <= ALLOWED_GLOBALS
    assert ALLOWED_GLOBALS - named == NOT_NAMED_BY_THE_PACKAGED_DATA


@pytest.mark.parametrize(("module", "name"), [
    ("os", "system"), ("builtins", "eval"), ("numpy", "memmap"), ("numpy.testing", "runstring"),
    ("sklearn", "os.system"), ("scipy._lib._testutils", "PytestTester"),
])
def test_anything_else_is_refused_by_name(module, name):
    payload = (b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
               + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode()
               + pickle.STACK_GLOBAL + pickle.STOP)
    with pytest.raises(RefusedPickle, match=f"it names {module}.{name}, which is not on the list"):
        load_model_pickle(payload)
