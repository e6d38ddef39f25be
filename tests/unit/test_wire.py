import numpy as np
import pytest

from cacovid_rl.wire import WireError, packb, read_file, unpackb, write_file


def test_round_trip_with_arrays(tmp_path):
    obj = {
        "a": np.arange(12, dtype=np.float16).reshape(3, 4),
        "b": [np.zeros(0, np.int32), 3, "x", None, 1.5],
        "c": {"nested": np.array([True, False])},
        "s": np.float32(2.5),
    }
    out = unpackb(packb(obj))
    assert out["a"].dtype == np.float16 and out["a"].shape == (3, 4)
    np.testing.assert_array_equal(out["a"], obj["a"])
    assert out["b"][0].shape == (0,) and out["b"][1:] == [3, "x", None, 1.5]
    assert out["c"]["nested"].tolist() == [True, False]
    assert out["s"] == 2.5
    write_file(tmp_path / "x.msgpack", obj)
    np.testing.assert_array_equal(read_file(tmp_path / "x.msgpack")["a"], obj["a"])


def test_refuses_objects_and_garbage(tmp_path):
    with pytest.raises(TypeError):
        packb({"o": np.array([object()])})
    with pytest.raises(TypeError):
        packb({"f": lambda: 1})
    with pytest.raises(WireError, match="trajectory"):
        unpackb(b"\xc1\xc1garbage", what="trajectory")
    with pytest.raises(WireError, match="does not exist"):
        read_file(tmp_path / "nope.msgpack")
