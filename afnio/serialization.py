"""``afnio.save`` / ``afnio.load``: checkpoints as a zip archive holding one JSON document.

There is no pickle anywhere: loading a file only parses JSON and rebuilds a closed set of types
(numbers, strings, ``None``, lists, tuples, dicts, OrderedDicts, Variables, Parameters and model
clients), so a hostile file can't run code. A file carrying a pickle — a raw pickle, or a zip
with a ``.pkl`` member as ``torch.save`` writes — is refused before anything in it is read.

Model clients are stored as class name + secret-free config (:func:`client_to_config`). Loading
is data only: by default a stored client comes back as that description (a dict
``{"class": ..., "config": ...}``), so a file can neither construct a client, nor send a key to
an endpoint it names, nor create a cache file at a path it names. ``load(f, load_clients=True)``
rebuilds them with :func:`client_from_config` (afnio's own client classes, or ones your code
registered, only: a file never makes afnio import a module) — for files you trust.

``load`` refuses, before decompressing them, files whose JSON would exceed ``max_size`` bytes
(default :data:`MAX_SIZE`) or whose compression ratio exceeds ``max_ratio`` (default
:data:`MAX_RATIO`); any damaged or foreign file is a ``ValueError`` naming it.

Saved Variables keep ``data``, ``role`` and ``requires_grad`` (Parameters also ``param_type``)
and come back as leaves without gradients, as ``torch.load`` returns tensors. A Variable or client
saved several times in one object is restored as one shared object.

Example:
    >>> import io, afnio
    >>> from collections import OrderedDict
    >>> state = OrderedDict(prompt=afnio.Variable("Be brief.", role="system prompt"))
    >>> buffer = io.BytesIO()
    >>> afnio.serialization.save({"agent": state, "epoch": 3}, buffer)
    >>> restored = afnio.serialization.load(io.BytesIO(buffer.getvalue()))
    >>> restored["epoch"], restored["agent"]["prompt"].data
    (3, 'Be brief.')
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

from afnio._variable import Variable
from afnio.cognitive.parameter import Parameter, ParameterType
from afnio.models.model import ChatCompletionModel, client_from_config, client_to_config

__all__ = ["MAX_RATIO", "MAX_SIZE", "load", "save", "write_atomically"]

FORMAT = "afnio"
VERSION = 1
MEMBER = "afnio.json"

MAX_SIZE = 256 * 2**20
"""Largest checkpoint JSON (bytes, decompressed) :func:`load` reads unless told otherwise."""
MAX_RATIO = 200.0
"""Largest decompressed/compressed size ratio :func:`load` accepts unless told otherwise (a
checkpoint's JSON compresses 3 to 30 times; a decompression bomb, thousands of times)."""
_RATIO_FLOOR = 2**20  # ratios of members smaller than this don't matter

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_SECRET_KEY = re.compile(r"api_?key|secret|password|passwd|credential|auth", re.IGNORECASE)

FileLike = str | os.PathLike[str] | IO[bytes]


# ---------------------------------------------------------------------------------- encoding
class _Encoder:
    def __init__(self) -> None:
        self._ids: dict[int, int] = {}
        self._keep_alive: list[Any] = []
        self._open_containers: set[int] = set()

    def _shared(self, obj: Any) -> dict[str, Any] | None:
        """A reference to ``obj`` if it was already written, else register it and return None."""
        if id(obj) in self._ids:
            return {"$type": "ref", "id": self._ids[id(obj)]}
        self._ids[id(obj)] = len(self._ids)
        self._keep_alive.append(obj)
        return None

    def encode(self, obj: Any, path: str) -> Any:
        if obj is None or type(obj) in (bool, str, int, float):
            return obj
        if isinstance(obj, Variable):
            return self._variable(obj)
        if isinstance(obj, ChatCompletionModel):
            return self._client(obj, path)
        if isinstance(obj, ParameterType):
            return {"$type": "ParameterType", "value": obj.value}
        if type(obj) in (list, tuple, dict, OrderedDict):
            if id(obj) in self._open_containers:
                raise ValueError(f"afnio.save: {path} contains itself (a reference cycle)")
            self._open_containers.add(id(obj))
            try:
                return self._container(obj, path)
            finally:
                self._open_containers.discard(id(obj))
        hint = " (save its state_dict() instead)" if hasattr(obj, "state_dict") else ""
        raise TypeError(
            f"afnio.save: cannot save {path} of type {type(obj).__name__}{hint}; supported are "
            "None, bool, int, float, str, list, tuple, dict, OrderedDict, Variable, Parameter "
            "and ChatCompletionModel clients"
        )

    def _container(self, obj: list | tuple | dict, path: str) -> Any:
        if isinstance(obj, list):
            return [self.encode(item, f"{path}[{i}]") for i, item in enumerate(obj)]
        if isinstance(obj, tuple):
            items = [self.encode(item, f"{path}[{i}]") for i, item in enumerate(obj)]
            return {"$type": "tuple", "items": items}
        pairs = [
            [self.encode(key, f"a key of {path}"), self.encode(value, f"{path}[{key!r}]")]
            for key, value in obj.items()
        ]
        return {"$type": type(obj).__name__, "items": pairs}

    def _variable(self, variable: Variable) -> dict[str, Any]:
        reference = self._shared(variable)
        if reference is not None:
            return reference
        data = variable.data
        encoded = {
            "$type": "Parameter" if isinstance(variable, Parameter) else "Variable",
            "id": self._ids[id(variable)],
            "data": list(data) if isinstance(data, list) else data,
            "role": variable.role,
            "requires_grad": variable.requires_grad,
        }
        if isinstance(variable, Parameter):
            encoded["param_type"] = variable.param_type.value
        return encoded

    def _client(self, client: ChatCompletionModel, path: str) -> dict[str, Any]:
        reference = self._shared(client)
        if reference is not None:
            return reference
        description = client_to_config(client)
        _refuse_secrets(description["config"], f"the config of {path} ({description['class']})")
        return {
            "$type": "ChatCompletionModel",
            "id": self._ids[id(client)],
            "class": description["class"],
            "config": self.encode(description["config"], f"the config of {path}"),
        }


def _refuse_secrets(config: Any, where: str) -> None:
    if isinstance(config, dict):
        for key, value in config.items():
            if isinstance(key, str) and _SECRET_KEY.search(key):
                raise ValueError(
                    f"afnio.save: {where} has a key {key!r}; secrets never go into checkpoints "
                    "(get_config() must leave them out)"
                )
            _refuse_secrets(value, where)
    elif isinstance(config, (list, tuple)):
        for value in config:
            _refuse_secrets(value, where)


def save(obj: Any, f: FileLike) -> None:
    """Save ``obj`` to ``f`` as a zip archive holding one JSON document.

    Args:
        obj: Nested dicts (any key of a supported type), OrderedDicts (order kept), lists,
            tuples, ``None``, bools, ints, floats, strings, Variables, Parameters and model
            clients — a module's or optimizer's ``state_dict()``, a training checkpoint.
        f: A path (written atomically: a crash mid-save leaves any previous file intact) or a
            binary file object open for writing.

    Raises:
        TypeError: If ``obj`` holds a value of another type (the message gives where).
        ValueError: If ``obj`` contains itself, or a client's config carries a secret.

    Example:
        >>> import io
        >>> save({"step": 1}, io.BytesIO())
    """
    document = {"format": FORMAT, "version": VERSION, "object": _Encoder().encode(obj, "object")}
    text = json.dumps(document, ensure_ascii=True, separators=(",", ":"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MEMBER, text)
    payload = buffer.getvalue()
    if isinstance(f, (str, os.PathLike)):
        write_atomically(payload, f)
    else:
        f.write(payload)


def write_atomically(payload: bytes, path: str | os.PathLike[str]) -> None:
    """Write ``payload`` to ``path`` so that a crash mid-write leaves any previous file intact.

    The bytes go to a temporary file beside ``path`` that then replaces it in one step.

    Args:
        payload: The file's new content.
        path: The file to write (its folder must exist).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "data.bin"
        >>> write_atomically(b"abc", target)
        >>> target.read_bytes()
        b'abc'
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # 0o666 so the checkpoint gets the usual permissions under the user's umask.
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- decoding
class _Decoder:
    def __init__(self, source: str, load_clients: bool) -> None:
        self._source = source
        self._load_clients = load_clients
        self._objects: dict[int, Any] = {}

    def fail(self, path: str, problem: str) -> ValueError:
        return ValueError(f"afnio.load: {self._source} is malformed at {path}: {problem}")

    def decode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str, int, float)):
            return value
        if isinstance(value, list):
            return [self.decode(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if not isinstance(value, dict):
            raise self.fail(path, f"unexpected JSON value of type {type(value).__name__}")
        kind = value.get("$type")
        handler = {
            "tuple": self._tuple,
            "dict": self._mapping,
            "OrderedDict": self._mapping,
            "Variable": self._variable,
            "Parameter": self._variable,
            "ParameterType": self._parameter_type,
            "ChatCompletionModel": self._client,
            "ref": self._reference,
        }.get(kind)
        if handler is None:
            raise self.fail(path, f"unknown $type {kind!r}")
        return handler(value, path)

    def _fields(self, node: dict, path: str, /, **expected: type | tuple[type, ...]) -> None:
        names = set(expected) | {"$type"}
        if set(node) != names:
            raise self.fail(path, f"a {node['$type']} needs the fields {sorted(names)}, "
                                  f"got {sorted(node)}")
        for name, kind in expected.items():
            if not isinstance(node[name], kind) or (kind is int and isinstance(node[name], bool)):
                raise self.fail(path, f"field {name!r} has type {type(node[name]).__name__}")

    def _tuple(self, value: dict, path: str) -> tuple:
        self._fields(value, path, items=list)
        return tuple(self.decode(item, f"{path}[{i}]") for i, item in enumerate(value["items"]))

    def _mapping(self, value: dict, path: str) -> dict:
        self._fields(value, path, items=list)
        result: dict = OrderedDict() if value["$type"] == "OrderedDict" else {}
        for i, pair in enumerate(value["items"]):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise self.fail(f"{path}.items[{i}]", "expected a [key, value] pair")
            key = self.decode(pair[0], f"a key of {path}")
            try:
                hash(key)
            except TypeError:
                raise self.fail(f"{path}.items[{i}]", f"unhashable key {key!r:.60}") from None
            result[key] = self.decode(pair[1], f"{path}[{key!r}]")
        return result

    def _register(self, value: dict, path: str, obj: Any) -> Any:
        if value["id"] in self._objects:
            raise self.fail(path, f"id {value['id']} is used twice")
        self._objects[value["id"]] = obj
        return obj

    def _variable(self, value: dict, path: str) -> Variable:
        fields: dict[str, Any] = {"id": int, "data": (str, int, float, list), "role": str,
                                  "requires_grad": bool}
        if value["$type"] == "Parameter":
            fields["param_type"] = str
        self._fields(value, path, **fields)
        try:
            if value["$type"] == "Parameter":
                variable: Variable = Parameter(
                    value["data"], role=value["role"], requires_grad=value["requires_grad"],
                    param_type=ParameterType(value["param_type"]),
                )
            else:
                variable = Variable(value["data"], role=value["role"],
                                    requires_grad=value["requires_grad"])
        except (TypeError, ValueError) as error:
            raise self.fail(path, str(error)) from None
        return self._register(value, path, variable)

    def _parameter_type(self, value: dict, path: str) -> ParameterType:
        self._fields(value, path, value=str)
        try:
            return ParameterType(value["value"])
        except ValueError as error:
            raise self.fail(path, str(error)) from None

    def _client(self, value: dict, path: str) -> ChatCompletionModel | dict[str, Any]:
        self._fields(value, path, id=int, config=dict, **{"class": str})
        config = self.decode(value["config"], f"{path}.config")
        if not isinstance(config, dict):
            raise self.fail(f"{path}.config", f"expected a dict, got {type(config).__name__}")
        description = {"class": value["class"], "config": config}
        if not self._load_clients:
            return self._register(value, path, description)
        try:
            client = client_from_config(description)
        except ValueError as error:
            raise self.fail(path, str(error)) from None
        return self._register(value, path, client)

    def _reference(self, value: dict, path: str) -> Any:
        self._fields(value, path, id=int)
        if value["id"] not in self._objects:
            raise self.fail(path, f"reference to unknown id {value['id']}")
        return self._objects[value["id"]]


def _read(f: FileLike, max_size: int) -> tuple[bytes, str]:
    if isinstance(f, (str, os.PathLike)):
        source = repr(os.fspath(f))
        size = os.path.getsize(f)
        if size > max_size:
            raise ValueError(f"afnio.load: {source} is {size} bytes, more than max_size="
                             f"{max_size}; pass a larger max_size= if you trust it")
        return Path(f).read_bytes(), source
    payload = f.read(max_size + 1)
    if not isinstance(payload, bytes):
        raise TypeError(
            f"afnio.load: the file object must be opened in binary mode, it returned "
            f"{type(payload).__name__}"
        )
    if len(payload) > max_size:
        raise ValueError(f"afnio.load: the file object holds more than max_size={max_size} "
                         "bytes; pass a larger max_size= if you trust it")
    return payload, "the file object"


# What zipfile raises on damaged bytes: its own error, zlib's, a short read, an unknown
# compression method or an "encrypted" flag bit, a bad offset (ValueError: negative seek).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
               ValueError, OSError, KeyError, OverflowError)


def _damaged(source: str, error: BaseException) -> ValueError:
    return ValueError(
        f"afnio.load: {source} is a damaged zip archive ({type(error).__name__}: {error}); it "
        "can't be loaded (a copy such as epoch=E.ckpt beside last.ckpt may be intact)"
    )


def _read_member(
    archive: zipfile.ZipFile, source: str, max_size: int, max_ratio: float
) -> bytes:
    """The JSON member's bytes, refusing sizes and ratios past the limits before inflating."""
    try:
        info = archive.getinfo(MEMBER)
    except _ZIP_ERRORS as error:
        raise _damaged(source, error) from None
    advice = "pass larger limits (max_size=, max_ratio=) if you trust the file"
    if info.file_size > max_size:
        raise ValueError(f"afnio.load: {source} would decompress to {info.file_size} bytes, "
                         f"more than max_size={max_size}; {advice}")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_FLOOR and ratio > max_ratio:
        raise ValueError(f"afnio.load: {source} has a compression ratio of {ratio:.0f} "
                         f"(more than max_ratio={max_ratio:g}), as a decompression bomb has; "
                         f"{advice}")
    try:
        with archive.open(info) as member:
            # The sizes in a zip header can lie: never inflate more than the limit.
            raw = member.read(max_size + 1)
    except _ZIP_ERRORS as error:
        raise _damaged(source, error) from None
    if len(raw) > max_size:
        raise ValueError(f"afnio.load: {source} decompresses to more than max_size="
                         f"{max_size} bytes; {advice}")
    return raw


def _looks_like_pickle(payload: bytes) -> bool:
    # Protocol 2+ pickles start with PROTO (0x80) then the protocol number.
    return len(payload) >= 2 and payload[0] == 0x80 and 2 <= payload[1] <= 5


def load(
    f: FileLike,
    *,
    max_size: int = MAX_SIZE,
    max_ratio: float = MAX_RATIO,
    load_clients: bool = False,
) -> Any:
    """Load an object written by :func:`save`.

    Args:
        f: A path or a binary file object open for reading.
        max_size: Refuse a file (or its JSON, decompressed) larger than this many bytes.
        max_ratio: Refuse a file whose JSON (if over 1 MiB) is more than this many times its
            compressed size.
        load_clients: Rebuild saved model clients (afnio's own classes, or ones registered
            with :func:`~afnio.models.register_client_class`), with the endpoints, cache paths
            and model files the file names. Only for files you trust; by default a saved client
            comes back as its ``{"class": ..., "config": ...}`` description and nothing is built.

    Returns:
        The saved object, rebuilt.

    Raises:
        ValueError: If ``f`` is not an afnio checkpoint — in particular if it is, or contains, a
            pickle, which is refused before any of it is read (unpickling can run arbitrary
            code) — if it is damaged, passes a size limit, or is malformed, or (with
            ``load_clients``) names a client class afnio doesn't know. The message names the
            file.
        TypeError: If a file object is not binary.

    Example:
        >>> import io
        >>> buffer = io.BytesIO()
        >>> save([1, ("a", None)], buffer)
        >>> load(io.BytesIO(buffer.getvalue()))
        [1, ('a', None)]
    """
    for name, limit in (("max_size", max_size), ("max_ratio", max_ratio)):
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ValueError(f"afnio.load: {name} must be a positive number, got {limit!r}")
    payload, source = _read(f, max_size)
    refusal = (
        "afnio never unpickles, because loading a pickle can run arbitrary code. Load it with "
        "the tool that wrote it and re-save what you need with afnio.save"
    )
    if _looks_like_pickle(payload):
        raise ValueError(f"afnio.load: {source} is a pickle, not an afnio checkpoint; {refusal}")
    if not payload.startswith(_ZIP_MAGIC):
        raise ValueError(
            f"afnio.load: {source} is not an afnio checkpoint (a zip archive written by "
            "afnio.save)"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
        names = archive.namelist()
    except _ZIP_ERRORS as error:
        raise _damaged(source, error) from None
    with archive:
        pickles = [name for name in names if name.endswith((".pkl", ".pickle"))]
        if pickles:
            raise ValueError(
                f"afnio.load: {source} contains pickle data ({', '.join(pickles)}), as "
                f"torch.save writes; {refusal}"
            )
        if names != [MEMBER]:
            raise ValueError(
                f"afnio.load: {source} is not an afnio checkpoint: expected one member "
                f"{MEMBER!r}, found {names}"
            )
        raw = _read_member(archive, source, max_size, max_ratio)
    if _looks_like_pickle(raw):
        raise ValueError(f"afnio.load: {source} holds a pickle in {MEMBER}; {refusal}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"afnio.load: {source} is not UTF-8 JSON: {error}") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise ValueError(f"afnio.load: {source} is nested too deeply to load") from None
    except ValueError as error:  # JSONDecodeError, or an integer too long to convert
        raise ValueError(f"afnio.load: {source} holds invalid JSON: {error}") from None
    try:
        if not (
            isinstance(document, dict)
            and document.get("format") == FORMAT
            and set(document) == {"format", "version", "object"}
        ):
            raise ValueError(f"afnio.load: {source} is not an afnio checkpoint document")
        if document["version"] != VERSION:
            raise ValueError(
                f"afnio.load: {source} has format version {document['version']!r}; this afnio "
                f"reads version {VERSION}"
            )
        return _Decoder(source, load_clients).decode(document["object"], "object")
    except RecursionError:
        raise ValueError(f"afnio.load: {source} is nested too deeply to load") from None
