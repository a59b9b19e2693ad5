"""Character vectors out of an R package's lazy-load data, without R.

An R package ships its data sets as a lazy-load database, ``data/Rdata.rdx`` and
``data/Rdata.rdb``. The ``.rdx`` file is a gzip'd serialization of the index
``list(variables = list(name = c(offset, length), ...), references = list(),
compressed = TRUE)``; the ``length`` bytes at ``offset`` in ``.rdb`` are the 4-byte big-endian
size of the uncompressed data, then a zlib stream holding the object's own serialization.

Both are R's XDR serialization format (``"X\\n"``, versions 2 and 3; every number big-endian).
Each item opens with a flags word: the type in the low 8 bits, "has attributes" in bit 9, "has
tag" in bit 10 and, for a string, its encoding in the "levels" above bit 12. This reader decodes
only what an index and a character vector are made of: strings (``NA`` included), character,
integer and logical vectors, lists, the pairlist that carries a ``names`` attribute, and the
symbols and back-references inside it. Anything else (another type, an attribute other than
``names``, bytes left over) raises ``ValueError``: a data file we do not understand must fail
loudly rather than yield a wrong text.
"""

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

# SEXP types (R's Rinternals.h) and the serialization-only pseudo-types (serialize.c).
SYMSXP = 1
LISTSXP = 2
CHARSXP = 9
LGLSXP = 10
INTSXP = 13
STRSXP = 16
VECSXP = 19
REFSXP = 255
NILVALUE_SXP = 254

_HAS_ATTRIBUTES = 1 << 9
_HAS_TAG = 1 << 10
# String encodings, in the "levels" bits (flags >> 12) of a CHARSXP; a string flagged neither
# (UTF-8 1 << 3, ASCII 1 << 6, or none: the writer's native encoding, checked to be UTF-8) is UTF-8.
_BYTES, _LATIN1 = 1 << 1, 1 << 2

NA_INTEGER = -(2**31)  # R's NA for integer and logical vectors


class _Reader:
    """A cursor over one XDR serialization."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: List[str] = []  # symbols, in the order a REFSXP counts them

    def integer(self) -> int:
        return self.integers(1)[0]

    def integers(self, n: int) -> Tuple[int, ...]:
        try:
            values = struct.unpack_from(f">{n}i", self.data, self.pos)
        except struct.error:
            raise ValueError(f"R serialization truncated at byte {self.pos}") from None
        self.pos += 4 * n
        return values

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"R serialization truncated at byte {self.pos}")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def item(self) -> Any:
        """The next item: None for NULL, str or None (NA) for a string, a list for a vector,
        a dict for a vector with names."""
        start = self.pos
        flags = self.integer()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == CHARSXP:
            return self.string(flags)
        if kind == SYMSXP:  # a name (here: an attribute's tag); later items refer back to it
            name = self.item()
            self.refs.append(name)
            return name
        if kind == REFSXP:
            index = (flags >> 8) or self.integer()  # 0: the index did not fit into the flags
            if not 0 < index <= len(self.refs):
                raise ValueError(f"R serialization: bad back-reference {index} at byte {start}")
            return self.refs[index - 1]
        if kind in (LGLSXP, INTSXP):
            values: List[Any] = list(self.integers(self.integer()))
        elif kind in (STRSXP, VECSXP):
            values = [self.item() for _ in range(self.integer())]
        else:
            raise ValueError(
                f"R serialization: unsupported SEXP type {kind} at byte {start} (this reader "
                "handles strings, character/integer/logical vectors, lists and their names)"
            )
        if not flags & _HAS_ATTRIBUTES:
            return values
        return self.named(values, self.attributes(start))

    def string(self, flags: int) -> Optional[str]:
        length = self.integer()
        if length == -1:
            return None  # NA_character_
        levels = flags >> 12
        if levels & _BYTES:
            raise ValueError(f"R serialization: a string of raw bytes at byte {self.pos - 8}")
        encoding = "latin-1" if levels & _LATIN1 else "utf-8"
        try:
            return self.raw(length).decode(encoding)
        except UnicodeDecodeError as e:
            raise ValueError(f"R serialization: a string that is not {encoding}: {e}") from e

    def attributes(self, start: int) -> Dict[str, Any]:
        """An attribute pairlist: (tag, value) cells chained through their CDR up to NULL."""
        attributes: Dict[str, Any] = {}
        flags = self.integer()
        while flags & 0xFF == LISTSXP:
            if flags & _HAS_ATTRIBUTES or not flags & _HAS_TAG:
                raise ValueError(f"R serialization: unexpected pairlist at byte {self.pos - 4}")
            tag = self.item()
            attributes[tag] = self.item()
            flags = self.integer()
        if flags & 0xFF != NILVALUE_SXP:
            raise ValueError(f"R serialization: attributes of the item at byte {start} malformed")
        return attributes

    @staticmethod
    def named(values: List[Any], attributes: Dict[str, Any]) -> Dict[str, Any]:
        names = attributes.pop("names", None)
        if attributes:
            raise ValueError(f"R serialization: unsupported attributes {sorted(attributes)}")
        if not isinstance(names, list) or len(names) != len(values):
            raise ValueError("R serialization: names do not match the vector they name")
        return dict(zip(names, values))


def unserialize(data: bytes) -> Any:
    """Decode one R object serialized in XDR format (what ``serialize(x, NULL)`` writes).

    Returns:
        Any: ``None`` for ``NULL``; a ``list`` for a vector (``str`` or ``None`` for ``NA``
        elements of a character vector; ``int`` elements, :data:`NA_INTEGER` for ``NA``, of an
        integer or logical one); a ``dict`` for a vector with names.

    Raises:
        ValueError: if ``data`` is not a version 2 or 3 XDR serialization, holds an item this
            reader does not decode, or does not end where the object does.
    """
    reader = _Reader(data)
    if reader.raw(2) != b"X\n":
        raise ValueError("Not an R serialization in XDR format (it does not start with 'X\\n')")
    version, _writer_version, _min_reader_version = reader.integers(3)
    if version not in (2, 3):
        raise ValueError(f"R serialization version {version}; this reader handles 2 and 3")
    if version == 3:
        native_encoding = reader.raw(reader.integer()).decode("ascii")
        if native_encoding.upper() not in ("UTF-8", "UTF8"):
            raise ValueError(f"R serialization written in native encoding {native_encoding}")
    value = reader.item()
    if reader.pos != len(data):
        raise ValueError(f"R serialization: {len(data) - reader.pos} bytes after the object")
    return value


def read_lazyload_db(base: Path) -> Dict[str, Any]:
    """Every object of the lazy-load database ``base.rdx`` + ``base.rdb``, by name.

    Raises:
        ValueError: if the index or an entry cannot be decoded, or entries are not
            zlib-compressed (R's ``compressed = TRUE``).
    """
    base = Path(base)
    index = unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise ValueError(f"{base}.rdx is not a lazy-load index")
    if index.get("compressed") != [1]:
        raise ValueError(f"{base}.rdb: compression {index.get('compressed')}; only zlib is read")
    database = base.with_suffix(".rdb").read_bytes()
    objects: Dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        entry = database[offset : offset + length]
        (size,) = struct.unpack(">I", entry[:4])
        data = zlib.decompress(entry[4:])
        if len(data) != size:
            raise ValueError(f"{base}.rdb: {name} has {len(data)} bytes, the entry says {size}")
        objects[name] = unserialize(data)
    return objects
