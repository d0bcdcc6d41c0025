"""Reading pickled annotations without running code from them.

Annotation pickles (CLIP4Clip's `raw-captions.pkl`) hold only plain dicts, lists and strings, which
unpickle without any global lookup. Every code path by which a pickle can run code (REDUCE, NEWOBJ,
INST, OBJ, BUILD, extension codes) first needs a class or function from `find_class`, so refusing
every lookup there is enough to keep a hostile file inert.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from pipeline.errors import UserError

# All of a dataset's captions pickle is a few MB; unpickled, plain data takes several times its file size in memory.
MAX_BYTES = 256 * 2**20


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that resolves no globals at all, so only builtin containers and scalars load."""

    def __init__(self, file, source: str) -> None:
        # Python 2 pickles store captions as byte strings; UTF-8 is what such annotation files hold.
        super().__init__(file, encoding="utf-8")
        self._source = source

    def find_class(self, module: str, name: str):
        raise UserError(
            f"{self._source}: refused to unpickle '{module}.{name}': only plain dicts, lists and strings "
            "are allowed; re-save the annotations as plain Python data (or JSON) from a trusted source"
        )


def safe_load(path: Path) -> object:
    """Unpickle a file that may hold only plain data (dicts, lists, tuples, strings, numbers)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise UserError(
                    f"{path}: {size:,} bytes, more than the {MAX_BYTES // 2**20} MiB an annotation pickle may hold; "
                    "check that this is the captions file"
                )
            return _PlainDataUnpickler(f, str(path)).load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    # A truncated or foreign file surfaces as any of these, depending on where the bytes stop making sense;
    # a corrupt length field asks for more memory than exists, a corrupt float overflows.
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        MemoryError,
        OverflowError,
    ) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid pickle ({reason}); re-download or re-create the file") from None
