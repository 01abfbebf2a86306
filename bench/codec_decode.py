"""Per-record decode cost of Loom's codecs against the payload library called directly.

    .venv/bin/python bench/codec_decode.py [--records 1000000] [--repeat 21]

A codec's ``decoder`` (what the source calls per record) is the library's own
callable; a failed decode becomes ``loom.errors.DecodeError`` afterwards
(``Codec.wire_error``). This checks that a *valid* record pays nothing for
Loom's codec: best of ``--repeat`` loops of ``--records`` calls, in ns per
record, for a 2-field msgspec Struct, the bench's 6-field order (``work.py``'s
shape) and the same order as a pydantic model. (A wrapper that converted the
error inside ``decoder`` measured +48 to +112 ns per valid record.)
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

import msgspec
import pydantic
from work import Order  # the bench's order (this folder is on sys.path when run as a script)

from loom.streaming.codecs import build_codec


class Small(msgspec.Struct):
    id: str
    amount: float


class ModelOrder(pydantic.BaseModel):
    id: str
    amount: float
    currency: str
    customer: str
    country: str
    quantity: int


SMALL = b'{"id":"order-000123","amount":42.5}'
ORDER = (
    b'{"id":"order-000123","amount":42.5,"currency":"EUR",'
    b'"customer":"c-0042","country":"DE","quantity":3}'
)


def ns_per_call(decode: Callable[[bytes], Any], data: bytes, records: int, repeat: int) -> float:
    loop = "for _ in calls: decode(data)"
    names = {"decode": decode, "data": data, "calls": range(records)}
    return min(timeit.repeat(loop, globals=names, number=1, repeat=repeat)) / records * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    cases = [
        ("msgspec, 2 fields", msgspec.json.Decoder(Small).decode, Small, SMALL),
        ("msgspec, 6 fields", msgspec.json.Decoder(Order).decode, Order, ORDER),
        ("pydantic, 6 fields", pydantic.TypeAdapter(ModelOrder).validate_json, ModelOrder, ORDER),
    ]
    print(f"{'payload':<20} {'library':>9} {'codec':>9} {'cost':>8}   (ns per valid record)")
    for name, direct, payload, data in cases:
        library = ns_per_call(direct, data, args.records, args.repeat)
        codec = ns_per_call(build_codec("json", payload).decoder, data, args.records, args.repeat)
        print(f"{name:<20} {library:>9.1f} {codec:>9.1f} {codec - library:>+8.1f}")


if __name__ == "__main__":
    main()
