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

    ``decoder`` is the one way to decode: the callable the source calls per
    record. Every codec's raises :class:`DecodeError` (with the payload
    library's message) for bytes that are malformed or do not validate as the
    payload type, so a ``WIRE`` dead letter's ``exception_type`` is
    ``DecodeError`` whether the payload is a msgspec ``Struct`` or a pydantic
    model. Codecs subclass this protocol to inherit ``encoder``, which
    defaults to ``encode``; a codec with a faster callable overrides it.
    """

    @property
    def decoder(self) -> Callable[[bytes], Any]:
        """Decodes one record value; raises :class:`DecodeError` for invalid bytes."""
        ...

    def encode(self, value: Any) -> bytes: ...

    @property
    def encoder(self) -> Callable[[Any], bytes]:
        """The fastest callable that encodes."""
        return self.encode


def _raising_decode_error(
    decode: Callable[[bytes], Any], library_error: type[Exception]
) -> Callable[[bytes], Any]:
    """``decode``, with ``library_error`` turned into :class:`DecodeError`.

    The cost per valid record is the closure's call; the ``try`` itself is
    free when nothing raises. ``bench/codec_decode.py`` (Python 3.11, best
    of 11-21 x 10^6 calls, a shared 2-core machine): a 2-field msgspec
    Struct from JSON 180-183 ns directly, 205-211 ns through this closure,
    so ~30 ns, under 1% of the 4-5 µs of CPU a record costs end to end
    (docs/benchmarks.md); for the bench's 6-field order and for pydantic
    models the difference is within run-to-run noise (pydantic went
    through the same kind of wrapper before, ``Codec.decode``).
    """

    def decoder(data: bytes) -> Any:
        try:
            return decode(data)
        except library_error as exc:
            raise DecodeError(str(exc)) from exc

    return decoder


def _is_pydantic_model(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _encode_hook(value: Any) -> Any:
    """Let msgspec encode pydantic models found inside untyped payloads."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    raise NotImplementedError(f"cannot encode objects of type {type(value).__name__}")


class MsgspecCodec(Codec):
    """JSON or msgpack through msgspec, validating into ``payload_type``."""

    def __init__(self, fmt: CodecName, payload_type: Any) -> None:
        module = msgspec.json if fmt == "json" else msgspec.msgpack
        target = Any if payload_type is None else payload_type
        # msgspec.ValidationError (invalid shape) is a msgspec.DecodeError.
        self._decoder = _raising_decode_error(module.Decoder(target).decode, msgspec.DecodeError)
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

    def __init__(self, payload_type: type[pydantic.BaseModel]) -> None:
        self._adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(payload_type)
        # pydantic reports malformed JSON as a ValidationError too.
        self._decoder = _raising_decode_error(self._adapter.validate_json, pydantic.ValidationError)

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
