"""afnio.save / afnio.load: JSON-in-zip round trips, and no pickle ever."""

import builtins
import importlib
import io
import json
import math
import pickle
import sys
import zipfile
from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afnio import Variable
from afnio.cognitive.parameter import Parameter, ParameterType
from afnio.models.model import client_to_config, register_client_class
from afnio.serialization import load, save
from afnio.testing import ScriptedModel


def same(a, b):
    """Structural equality that also compares types, Variable fields and NaNs."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Variable):
        return (
            same(a.data, b.data)
            and a.role == b.role
            and a.requires_grad == b.requires_grad
            and getattr(a, "param_type", None) == getattr(b, "param_type", None)
        )
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def round_trip(obj):
    buffer = io.BytesIO()
    save(obj, buffer)
    return load(io.BytesIO(buffer.getvalue()))


def _archive(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


# ------------------------------------------------------------------ round trips
def test_round_trip_of_a_checkpoint_like_object(tmp_path):
    prompt = Parameter("Classify {message}.", role="system prompt", param_type=ParameterType.PROMPT)
    frozen = Parameter(
        0.2, role="temperature", requires_grad=False, param_type=ParameterType.HYPERPARAM
    )
    checkpoint = {
        "agent": OrderedDict([("prompt", prompt), ("temperature", frozen)]),
        "optimizer": {
            "state": {
                0: {
                    "momentum": [
                        (
                            Variable("old prompt", role="system prompt"),
                            [Variable("be precise", role="feedback")],
                        )
                    ]
                }
            },
            "param_groups": [{"params": [0, 1], "momentum": 3, "constraints": None}],
        },
        "epoch": 4,
        "batch": 0,
        "metrics": {"val_accuracy": 0.75, "costs": [0.01, 1e-9], "best": float("inf")},
        ("tuple", "key"): (True, None, -7, ["x", Variable([1, 2.5], role="scores")]),
    }
    path = tmp_path / "checkpoint.afnio"
    save(checkpoint, path)
    assert zipfile.ZipFile(path).namelist() == ["afnio.json"]
    restored = load(str(path))
    assert same(restored, checkpoint)
    assert list(restored["agent"]) == ["prompt", "temperature"]
    assert type(restored["agent"]) is OrderedDict
    assert isinstance(restored["agent"]["prompt"], Parameter)
    assert restored["agent"]["prompt"].param_type is ParameterType.PROMPT
    assert restored["agent"]["temperature"].requires_grad is False


def test_file_objects_and_paths(tmp_path):
    with open(tmp_path / "a.afnio", "wb") as handle:
        save([1, "two"], handle)
    with open(tmp_path / "a.afnio", "rb") as handle:
        assert load(handle) == [1, "two"]
    save({"x": 1}, str(tmp_path / "b.afnio"))
    assert load(tmp_path / "b.afnio") == {"x": 1}


def test_loaded_variables_are_leaves_without_gradients():
    x = Variable("draft", role="draft", requires_grad=True)
    y = x + " v2"
    x.append_grad(Variable("shorter", role="feedback to draft"))
    restored_x, restored_y = round_trip([x, y])
    assert restored_x.grad == [] and restored_x.is_leaf and restored_x.requires_grad
    assert restored_y.is_leaf and restored_y.data == "draft v2" and restored_y.requires_grad


def test_shared_variables_and_clients_stay_shared():
    prompt = Parameter("p", role="prompt")
    client = ScriptedModel(["ok"], latency=0.25)
    restored = round_trip({"a": prompt, "b": [prompt], "c": client, "d": (client,)})
    assert restored["a"] is restored["b"][0]
    assert restored["c"] is restored["d"][0]
    buffer = io.BytesIO()
    save({"c": client, "d": (client,)}, buffer)
    rebuilt = load(io.BytesIO(buffer.getvalue()), load_clients=True)
    assert isinstance(rebuilt["c"], ScriptedModel) and rebuilt["c"] is rebuilt["d"][0]
    other = round_trip([Variable("same", role="r"), Variable("same", role="r")])
    assert other[0] is not other[1]


def test_model_clients_are_saved_as_class_and_config():
    client = ScriptedModel(["reply"], latency=0.5, model="scripted-mini")
    buffer = io.BytesIO()
    save({"optimizer_client": client}, buffer)
    document = json.loads(zipfile.ZipFile(io.BytesIO(buffer.getvalue())).read("afnio.json"))
    entry = document["object"]["items"][0][1]
    assert entry["$type"] == "ChatCompletionModel"
    assert entry["class"] == "afnio.testing.scripted.ScriptedModel"
    described = load(io.BytesIO(buffer.getvalue()))["optimizer_client"]
    assert described == client_to_config(client)  # data only, unless asked
    restored = load(io.BytesIO(buffer.getvalue()), load_clients=True)["optimizer_client"]
    assert type(restored) is ScriptedModel
    assert restored.get_config() == client.get_config()
    assert restored.model == "scripted-mini" and restored.latency == 0.5


class KeyedModel(ScriptedModel):
    """A client holding an API key it must never write out."""

    def __init__(self, api_key=None, leak=False, **options):
        super().__init__(**options)
        self.api_key = api_key
        self.leak = leak

    def get_config(self):
        config = {**super().get_config(), "leak": self.leak}
        if self.leak:
            config["api_key"] = self.api_key
        return config


def test_api_keys_never_reach_the_file(tmp_path):
    buffer = io.BytesIO()
    save({"client": KeyedModel(api_key="sk-very-secret")}, buffer)
    assert b"sk-very-secret" not in zipfile.ZipFile(buffer).read("afnio.json")
    with pytest.raises(ValueError, match="KeyedModel' is not one afnio knows"):
        load(io.BytesIO(buffer.getvalue()), load_clients=True)
    register_client_class(KeyedModel)
    restored = load(io.BytesIO(buffer.getvalue()), load_clients=True)["client"]
    assert isinstance(restored, KeyedModel) and restored.api_key is None

    target = tmp_path / "leaky.afnio"
    with pytest.raises(ValueError, match="has a key 'api_key'; secrets never go into checkpoints"):
        save({"client": KeyedModel(api_key="sk-very-secret", leak=True)}, target)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_values_name_their_place():
    with pytest.raises(TypeError, match=r"cannot save object\['a'\]\[1\] of type set"):
        save({"a": [1, {2}]}, io.BytesIO())

    class Agent:
        def state_dict(self):
            return {}

    with pytest.raises(TypeError, match=r"save its state_dict\(\) instead"):
        save(Agent(), io.BytesIO())


def test_reference_cycles_are_refused():
    looped = [1]
    looped.append(looped)
    with pytest.raises(ValueError, match="contains itself"):
        save(looped, io.BytesIO())


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ckpt.afnio"
    save({"epoch": 1}, path)
    with pytest.raises(TypeError):
        save({"epoch": 2, "bad": object()}, path)
    assert load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.afnio"]


# ------------------------------------------------------------------ Hypothesis round trip
def _numbers():
    return st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True))


variables = st.builds(
    Variable,
    data=st.one_of(
        st.text(), _numbers(), st.lists(st.text(), max_size=4), st.lists(_numbers(), max_size=4)
    ),
    role=st.text(max_size=20),
    requires_grad=st.booleans(),
)
parameters = st.builds(
    Parameter,
    data=st.one_of(st.text(), st.lists(st.text(), max_size=3)),
    role=st.text(max_size=20),
    requires_grad=st.booleans(),
    param_type=st.sampled_from(ParameterType),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    _numbers(),
    st.text(),
    variables,
    parameters,
    st.sampled_from(ParameterType),
)
keys = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=10),
    st.tuples(st.integers(), st.text(max_size=5)),
)
nested = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(lambda d: OrderedDict(reversed(d.items()))),
    ),
    max_leaves=20,
)


@given(nested)
def test_round_trip_property(obj):
    assert same(round_trip(obj), obj)


# ------------------------------------------------------------------ hostile files
class _WritesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _hostile_pickle(marker, protocol=pickle.DEFAULT_PROTOCOL):
    return pickle.dumps(_WritesMarker(marker), protocol=protocol)


def test_the_hostile_payload_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "proof"
    pickle.loads(_hostile_pickle(marker)).close()
    assert marker.exists()  # so the tests below would notice if afnio unpickled it


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_raw_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    path.write_bytes(_hostile_pickle(marker, protocol))
    with pytest.raises(
        ValueError, match="is a pickle, not an afnio checkpoint; afnio never unpickles"
    ):
        load(path)
    assert not marker.exists()


def test_a_text_protocol_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(ValueError, match="is not an afnio checkpoint"):
        load(io.BytesIO(_hostile_pickle(marker, protocol=0)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "layout",
    [
        lambda p: {"archive/data.pkl": p, "archive/version": b"3\n"},  # torch.save's layout
        lambda p: {"afnio.json": b'{"format":"afnio","version":1,"object":1}', "data.pkl": p},
    ],
)
def test_a_zip_carrying_a_pickle_is_refused_and_nothing_runs(tmp_path, layout):
    marker = tmp_path / "marker"
    payload = _archive(layout(_hostile_pickle(marker)))
    with pytest.raises(
        ValueError,
        match=r"contains pickle data \(.*data.pkl\), as torch.save "
        "writes; afnio never unpickles",
    ):
        load(io.BytesIO(payload))
    assert not marker.exists()


def test_pickles_hidden_under_other_names_are_refused(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(ValueError, match="holds a pickle in afnio.json"):
        load(io.BytesIO(_archive({"afnio.json": _hostile_pickle(marker)})))
    with pytest.raises(ValueError, match=r"expected one member 'afnio.json', found"):
        load(io.BytesIO(_archive({"afnio.json": b"{}", "payload.bin": _hostile_pickle(marker)})))
    assert not marker.exists()


def _document(obj):
    return io.BytesIO(
        _archive(
            {"afnio.json": json.dumps({"format": "afnio", "version": 1, "object": obj}).encode()}
        )
    )


def test_a_file_cannot_make_afnio_import_a_module():
    assert "antigravity" not in sys.modules  # importing it would open a web browser
    client = {
        "$type": "ChatCompletionModel",
        "id": 0,
        "class": "antigravity.Client",
        "config": {"$type": "dict", "items": []},
    }
    assert load(_document(client)) == {"class": "antigravity.Client", "config": {}}
    with pytest.raises(ValueError, match="'antigravity.Client' is not one afnio knows"):
        load(_document(client), load_clients=True)
    assert "antigravity" not in sys.modules


@pytest.mark.parametrize("target", ["os.system", "builtins.object", "subprocess.Popen"])
def test_a_file_cannot_name_an_arbitrary_callable(target):
    client = {
        "$type": "ChatCompletionModel",
        "id": 0,
        "class": target,
        "config": {"$type": "dict", "items": [["args", "touch /tmp/afnio-pwned"]]},
    }
    importlib.import_module(target.rpartition(".")[0])  # even an imported module's names
    with pytest.raises(ValueError, match="is not one afnio knows"):
        load(_document(client), load_clients=True)


def test_a_tampered_client_neither_redirects_the_key_nor_creates_files(tmp_path):
    # Issue 14, defect 2: another base_url received OPENAI_API_KEY; a cache path in a config
    # created directories and an SQLite file during afnio.load.
    cache_path = tmp_path / "planted" / "dir" / "cache.sqlite"
    client = {
        "$type": "ChatCompletionModel",
        "id": 0,
        "class": "afnio.models.openai.AsyncOpenAI",
        "config": {"$type": "dict", "items": [
            ["model", "gpt-4.1-nano"],
            ["base_url", "http://attacker.invalid/v1"],
            ["cache", {"$type": "dict", "items": [["path", str(cache_path)],
                                                  ["mode", "read_write"]]}],
        ]},
    }
    loaded = load(_document(client))
    assert loaded["config"]["base_url"] == "http://attacker.invalid/v1"  # data, nothing built
    assert not (tmp_path / "planted").exists()


def _bomb(json_bytes: int) -> bytes:
    filler = b" " * json_bytes
    document = b'{"format":"afnio","version":1,"object":"x"' + filler + b"}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("afnio.json", document)
    return buffer.getvalue()


def test_a_decompression_bomb_is_refused_before_it_is_inflated():
    # Issue 14, defect 7: a 306 KB file holding 300 MB of JSON loaded (+600 MB of memory).
    payload = _bomb(50 * 2**20)
    assert len(payload) < 100_000
    with pytest.raises(ValueError, match=r"compression ratio of \d+ \(more than max_ratio=200\)"):
        load(io.BytesIO(payload))
    with pytest.raises(ValueError, match="would decompress to .* more than max_size=1048576"):
        load(io.BytesIO(payload), max_size=2**20, max_ratio=10**6)
    assert load(io.BytesIO(payload), max_ratio=10**6) == "x"  # overridable for trusted files
    with pytest.raises(ValueError, match="max_size must be a positive number"):
        load(io.BytesIO(payload), max_size=0)


def test_a_zip_header_that_lies_about_the_size_is_still_capped():
    payload = bytearray(_bomb(3 * 2**20))
    # Patch the declared uncompressed size (local header and central directory) to 100 bytes.
    true_size = (3 * 2**20 + 43).to_bytes(4, "little")
    assert payload.count(true_size) == 2
    payload = bytes(payload).replace(true_size, (100).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="decompresses to more than max_size=2097152|damaged"):
        load(io.BytesIO(payload), max_size=2 * 2**20)


def test_a_file_larger_than_max_size_is_not_read(tmp_path):
    path = tmp_path / "big.afnio"
    save({"text": "x" * 5000}, path)
    with pytest.raises(ValueError, match=f"{str(path)!r} is .* bytes, more than max_size=100"):
        load(path, max_size=100)
    with pytest.raises(ValueError, match="file object holds more than max_size=100"):
        load(io.BytesIO(path.read_bytes()), max_size=100)


@given(position=st.integers(min_value=0, max_value=10_000), value=st.integers(0, 255))
def test_every_damaged_byte_gives_a_value_error_naming_the_file(position, value):
    # Issue 14, defect 7: a corrupted byte inside the compressed member raised zlib.error /
    # BadZipFile instead of the documented ValueError naming the file.
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "state.afnio"
        save({"prompt": Parameter("Be brief. " * 50, role="prompt"), "step": 3}, path)
        payload = bytearray(path.read_bytes())
        index = position % len(payload)
        if payload[index] == value:
            value = (value + 1) % 256
        payload[index] = value
        path.write_bytes(bytes(payload))
        try:
            load(path)
        except ValueError as error:
            assert repr(str(path)) in str(error)


def test_a_corrupted_compressed_byte_is_a_value_error():
    buffer = io.BytesIO()
    save({"prompt": "Be brief. " * 200}, buffer)
    payload = bytearray(buffer.getvalue())
    start = payload.index(b"afnio.json") + len(b"afnio.json")
    for offset in (5, 40, 80):
        damaged = bytearray(payload)
        damaged[start + offset] ^= 0xFF
        with pytest.raises(ValueError, match="the file object"):
            load(io.BytesIO(bytes(damaged)))


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"$type": "set", "items": []}, r"malformed at object: unknown \$type 'set'"),
        ({"$type": "ref", "id": 3}, "reference to unknown id 3"),
        (
            {
                "$type": "Variable",
                "id": 0,
                "data": {"$type": "dict"},
                "role": "r",
                "requires_grad": False,
            },
            "field 'data' has type dict",
        ),
        (
            {"$type": "Variable", "id": 0, "data": [1, "a"], "role": "r", "requires_grad": False},
            "a batch must be all str or all numbers",
        ),
        ({"$type": "Variable", "id": 0, "data": "x", "role": "r"}, "needs the fields"),
        (
            {
                "$type": "Parameter",
                "id": 0,
                "data": "x",
                "role": "r",
                "requires_grad": True,
                "param_type": "weights",
            },
            "'weights' is not a valid ParameterType",
        ),
        ({"$type": "dict", "items": [[[1], 2]]}, r"unhashable key \[1\]"),
        ({"$type": "ChatCompletionModel", "id": 0, "class": "afnio.testing.scripted.ScriptedModel",
          "config": {"$type": "tuple", "items": []}}, r"config: expected a dict, got tuple"),
        (
            [{"$type": "tuple", "items": []}, {"$type": "dict", "items": [["k"]]}],
            r"malformed at object\[1\].items\[0\]: expected a \[key, value\] pair",
        ),
    ],
)
def test_malformed_documents_are_reported(obj, message):
    with pytest.raises(ValueError, match=message):
        load(_document(obj))


def test_other_files_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="is not an afnio checkpoint"):
        load(io.BytesIO(b'{"format": "afnio"}'))
    with pytest.raises(ValueError, match="format version 99"):
        load(io.BytesIO(_archive({"afnio.json": b'{"format":"afnio","version":99,"object":1}'})))
    with pytest.raises(ValueError, match="invalid JSON"):
        load(io.BytesIO(_archive({"afnio.json": b"{not json"})))
    deep = b'{"format":"afnio","version":1,"object":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ValueError, match="nested too deeply"):
        load(io.BytesIO(_archive({"afnio.json": deep})))
    with pytest.raises(TypeError, match="binary mode"):
        load(io.StringIO("text"))
