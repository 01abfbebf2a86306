"""Wire formats: bytes <-> payload objects, validating on decode.

JSON is the default because other teams' services must read our topics;
msgpack is there for internal high-volume topics and ``raw`` for bytes in,
bytes out. Payload types are ``msgspec.Struct`` (or anything msgspec can
validate); pydantic models are decoded and encoded through pydantic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import pydantic

from loom.errors import DecodeError as DecodeError  # noqa: PLC0414 (re-export)
from loom.streaming.nodes import CodecName

CODEC_NAMES: tuple[CodecName, ...] = ("json", "msgpack", "raw")


class Codec(Protocol):
    """Turns one record value into a payload and back.

    ``decoder`` is the callable the source calls per record: the payload
    library's own, with no wrapper (see :meth:`wire_error` for why). Codecs
    subclass this protocol to inherit ``encoder`` (defaults to ``encode``)
    and ``wire_error``; a codec with a faster callable overrides ``encoder``.
    """

    library_errors: tuple[type[Exception], ...] = ()
    """What ``decoder`` raises for bytes that are malformed or do not validate."""

    @property
    def decoder(self) -> Callable[[bytes], Any]:
        """Decodes one record value; raises one of :attr:`library_errors` for invalid bytes."""
        ...

    def encode(self, value: Any) -> bytes: ...

    @property
    def encoder(self) -> Callable[[Any], bytes]:
        """The fastest callable that encodes."""
        return self.encode

    def wire_error(self, exc: Exception) -> Exception:
        """What a ``WIRE`` dead letter reports for ``exc``, raised by ``decoder``.

        One :class:`DecodeError` (with the library's message) whether the
        payload is a msgspec ``Struct`` or a pydantic model, so a dead
        letter's ``exception_type`` does not depend on the payload library.
        The conversion happens after the failure, not in a wrapper around
        ``decoder``: a wrapper cost every *valid* record 48-112 ns here
        (``bench/codec_decode.py``, a 2- and a 6-field Struct from JSON,
        Python 3.11, a shared 2-core machine), 1-2.5% of a record's CPU.
        """
        if isinstance(exc, DecodeError) or not isinstance(exc, self.library_errors):
            return exc
        error = DecodeError(str(exc))
        error.__cause__ = exc
        return error


def _is_pydantic_model(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _encode_hook(value: Any) -> Any:
    """Let msgspec encode pydantic models found inside untyped payloads."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    raise NotImplementedError(f"cannot encode objects of type {type(value).__name__}")


class MsgspecCodec(Codec):
    """JSON or msgpack through msgspec, validating into ``payload_type``."""

    # msgspec.ValidationError (invalid shape) is a msgspec.DecodeError.
    library_errors = (msgspec.DecodeError,)

    def __init__(self, fmt: CodecName, payload_type: Any) -> None:
        module = msgspec.json if fmt == "json" else msgspec.msgpack
        target = Any if payload_type is None else payload_type
        self._decoder: Callable[[bytes], Any] = module.Decoder(target).decode
        self._encode: Callable[[Any], bytes] = module.Encoder(enc_hook=_encode_hook).encode

    @property
    def decoder(self) -> Callable[[bytes], Any]:
        return self._decoder

    def encode(self, value: Any) -> bytes:
        return self._encode(value)

    @property
    def encoder(self) -> Callable[[Any], bytes]:
        """msgspec's own ``encode``: no wrapper frame on the per-record path."""
        return self._encode


class PydanticJsonCodec(Codec):
    """JSON through pydantic, for payload types that are pydantic models."""

    # pydantic reports malformed JSON as a ValidationError too.
    library_errors = (pydantic.ValidationError,)

    def __init__(self, payload_type: type[pydantic.BaseModel]) -> None:
        self._adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(payload_type)
        self._decoder: Callable[[bytes], Any] = self._adapter.validate_json

    @property
    def decoder(self) -> Callable[[bytes], Any]:
        return self._decoder

    def encode(self, value: Any) -> bytes:
        return self._adapter.dump_json(value)


def _as_is(data: bytes) -> bytes:
    return data


class RawCodec(Codec):
    """Bytes in, bytes out; decoding cannot fail."""

    @property
    def decoder(self) -> Callable[[bytes], bytes]:
        return _as_is

    def encode(self, value: Any) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        raise TypeError(f"the raw codec writes bytes, got {type(value).__name__}")


def build_codec(fmt: CodecName, payload_type: Any) -> Codec:
    """Return the codec for ``fmt`` and ``payload_type``.

    Raises ``ValueError`` for a combination that cannot work (an unknown
    format, a typed payload with ``raw``, a pydantic model with msgpack),
    which the compiler reports as a flow problem.
    """
    if fmt not in CODEC_NAMES:
        raise ValueError(f"unknown codec {fmt!r}; expected one of {', '.join(CODEC_NAMES)}")
    if fmt == "raw":
        if payload_type not in (None, bytes):
            raise ValueError(f"the raw codec carries bytes, not {_type_name(payload_type)}")
        return RawCodec()
    if _is_pydantic_model(payload_type):
        if fmt != "json":
            raise ValueError(f"pydantic payloads support the json codec only, not {fmt!r}")
        return PydanticJsonCodec(payload_type)
    try:
        return MsgspecCodec(fmt, payload_type)
    except TypeError as exc:
        raise ValueError(f"{_type_name(payload_type)} cannot be a payload type: {exc}") from exc


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", repr(tp))
